"""kdcache bench quality / bench teachers run end to end on a tiny corpus and print every column."""
from __future__ import annotations

import json
import os

import pytest

from kdcache.train.rundir import RunDir
from helpers import cli_call


def test_bench_quality_pairs_runs_by_seed_counts_teacher_forwards_and_scores_every_image(tmp_path, corpus, vit_spec,
                                                                                        monkeypatch, capsys):
    out = str(tmp_path / "q")
    args = ["bench", "quality", "--out", out, "--data", corpus, "--teacher", vit_spec, "--student", "resnet18,img_size=32",
            "--schedules", "1,2", "--views", "1,3", "--option-views", "3", "--option", "cutmix", "--option", "opq 1/32",
            "--option", "reduced decode", "--option", "stored pixels",
            "--seeds", "0,1", "--folds", "3", "--batch-size", "4", "--train-tokens", "256", "--workers", "0"]
    code, text, err = cli_call(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "| epochs | variant | steps | kNN | kNN / online | kNN - online | linear | linear - online |" in text
    for row in ("| 1 | online |", "| 2 | online |", "| 1 | K=1 |", "| 2 | K=3 |", "| 2 | K=3 cutmix |", "| 2 | K=3 opq 1/32 |"):
        assert row in text, row
    r = json.load(open(os.path.join(out, "quality.json")))
    runs = r["runs"]
    n = 24  # the corpus's images, every one labelled
    assert len(runs) == 2 * (2 * 3 + 4)  # seeds x (schedules x (online + 2 K) + 4 options at the longest)
    for run in runs:  # the same optimizer steps at each schedule; every labelled image scored once
        assert run["steps"] == run["epochs"] * (n // 4) and run["n"] == n and run["folds"] == 3
        cfg = RunDir(run["run"]).read_config()
        assert cfg.seed == run["seed"] and cfg.optimisation.epochs == run["epochs"]
        if run["variant"] != "online":  # each seed's stores are drawn with that seed: the online run's views
            assert cfg.data.view_choice == "augmented" and cfg.store.endswith(f"-s{run['seed']}.zarr")
            import zarr
            assert zarr.open_group(cfg.store, mode="r").attrs["kdcache"]["view_policy"]["seed"] == run["seed"]
    by = {(x["variant"], x["epochs"], x["seed"]): x for x in runs}
    # teacher forwards, counted by the teachers: extraction is views x images; an online epoch is every image
    assert by[("K=1", 1, 0)]["teacher_images"] == n and by[("K=3", 2, 1)]["teacher_images"] == 3 * n
    assert by[("online", 2, 0)]["teacher_images"] - by[("online", 1, 0)]["teacher_images"] == n
    # rows: mean over seeds, and the paired difference to the online run of the same seed and schedule
    rows = {(x["variant"], x["epochs"]): x for x in r["rows"]}
    row = rows[("K=3", 2)]
    diffs = [by[("K=3", 2, s)]["knn"] - by[("online", 2, s)]["knn"] for s in (0, 1)]
    assert row["seeds"] == [0, 1] and abs(row["knn_vs_online"]["mean"] - sum(diffs) / 2) < 1e-12
    assert row["knn_vs_online"]["low"] <= row["knn_vs_online"]["mean"] <= row["knn_vs_online"]["high"]
    codes = rows[("K=3 opq 1/32", 2)]
    assert codes["bytes_per_image"] < row["bytes_per_image"] and "knn_over_store" in codes
    # the reduced decode: the same store, the student's images decoded at the scale they need, paired with K=3
    reduced = rows[("K=3 reduced decode", 2)]
    diffs = [by[("K=3 reduced decode", 2, s)]["knn"] - by[("K=3", 2, s)]["knn"] for s in (0, 1)]
    assert abs(reduced["knn_vs_store"]["mean"] - sum(diffs) / 2) < 1e-12
    assert RunDir(by[("K=3 reduced decode", 2, 0)]["run"]).read_config().data.decode == "reduced"
    assert RunDir(by[("K=3", 2, 0)]["run"]).read_config().data.decode == "full"
    assert "K=3 reduced decode at 2 epochs against K=3 (the same store" in text
    # the stored pixels: the same views' targets, the student's images from the store's JPEGs (no corpus read)
    pixels = RunDir(by[("K=3 stored pixels", 2, 0)]["run"]).read_config()
    assert pixels.data.images == "store" and "knn_vs_store" in rows[("K=3 stored pixels", 2)]
    assert open(os.path.join(out, "quality.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a second run reuses every store, run and score
    code, again, err = cli_call(monkeypatch, capsys, *args)
    assert code == 0 and again == text


def test_k_fold_scores_score_every_sample_once_against_sklearn():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from kdcache.bench.studies import kfold_scores
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    separable = np.eye(4)[y] * 5 + rng.normal(0, 0.1, (120, 4))
    r = kfold_scores(separable.astype(np.float32), y, folds=5)
    assert r == {"knn": 1.0, "linear": 1.0, "n": 120, "folds": 5}
    noise = rng.normal(size=(120, 16)).astype(np.float32)
    r = kfold_scores(noise, y, folds=4)
    # chance is 0.25; sklearn's own 4-fold logistic regression lands in the same range
    ref = (cross_val_predict(LogisticRegression(max_iter=1000), noise, y, cv=4) == y).mean()
    assert 0.05 < r["knn"] < 0.5 and 0.05 < r["linear"] < 0.5 and 0.05 < ref < 0.5


def test_bench_teachers_scores_every_image_over_seeds_with_paired_differences(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "t")
    variants = ["static weights", "task loss (static, weight 1)", "task loss + --balance dto",
                "EfficientNet-Lite0 fine-tuned on vit", "EfficientNet-Lite0 frozen + adapters on vit"]
    args = ["bench", "teachers", "--out", out, "--digits", "24", "--photos", "0", "--epochs", "1", "--batch-size", "8",
            "--vit-epochs", "1", "--seeds", "0,1", "--folds", "3", *[a for v in variants for a in ("--variant", v)]]
    code, text, err = cli_call(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "| variant | kNN | linear | effnet summary | effnet patch | vit summary | vit patch | fit s |" in text
    for row in ["| teacher effnet, cached", "| random-init student |", "| EfficientNet-Lite0, untouched |",
                "| task loss + --balance dto | static weights |", "| task loss + --balance dto | task loss (static, weight 1) |",
                "| EfficientNet-Lite0 frozen + adapters on vit | EfficientNet-Lite0 fine-tuned on vit |"] + [
                f"| {v} |" for v in variants]:
        assert row in text, row
    r = json.load(open(os.path.join(out, "teachers.json")))
    by = {(x["variant"], x["seed"]): x for x in r["runs"]}
    assert len(r["runs"]) == 2 * len(variants)
    for run in r["runs"]:  # every labelled image scored once; seeds are the students' own
        assert run["n"] == 24 and run["folds"] == 3
        assert RunDir(run["run"]).read_config().seed == run["seed"]
    rows = {x["variant"]: x for x in r["rows"]}
    dto = rows["task loss + --balance dto"]
    for ref in ("static weights", "task loss (static, weight 1)"):
        diffs = [by[("task loss + --balance dto", s)]["knn"] - by[(ref, s)]["knn"] for s in (0, 1)]
        assert dto["vs"][ref]["knn"]["mean"] == pytest.approx(sum(diffs) / 2)  # paired by seed
    assert dto["knn"]["n"] == 2 and set(dto["fidelity"]) == {"effnet", "vit"}
    frozen = rows["EfficientNet-Lite0 frozen + adapters on vit"]
    assert set(frozen["fidelity"]) == {"vit"}  # it learns the second teacher only
    assert RunDir(by[("EfficientNet-Lite0 frozen + adapters on vit", 0)]["run"]).read_config().heads.frozen_backbone is True
    assert 0 < rows["task loss + --balance dto"]["weights"]["task"] < 2  # the logged DTO-KD weights, averaged
    code, again, err = cli_call(monkeypatch, capsys, *args)  # a second run reuses every run and score
    assert code == 0 and again == text


def test_bench_softlabels_runs_every_part_with_paired_seeds(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "s")
    code, text, err = cli_call(monkeypatch, capsys, "bench", "softlabels", "--out", out, "--photos", "16", "--held-photos", "8",
                               "--views", "2", "--k", "3", "--epochs", "1", "--digits", "40", "--held-digits", "20",
                               "--digit-epochs", "1", "--teacher-epochs", "1", "--bytes-images", "8", "--seeds", "0,1",
                               "--batch-size", "8", "--workers", "0")
    assert code == 0, err
    for row in ("| cached top-3 |", "| online (full logits) |", "| cached top-1 (hard teacher labels) |", "| soft labels |",
                "| hard labels only |", "| soft + hard labels |", "| 5 |", "| 100 |"):
        assert row in text
    r = json.load(open(os.path.join(out, "softlabels.json")))
    for part, key in (("imagenet", "agreement_top1"), ("digits", "accuracy_top1")):
        steps = {s for row in r[part]["rows"].values() for s in row["steps"]}
        assert len(steps) == 1  # every variant the same optimizer steps
        for row in r[part]["rows"].values():
            assert len(row[key]) == 2 and row["mean"]["n"] == 2  # one value per seed
    diff = r["digits"]["rows"]["soft labels"]["vs_hard_labels"]
    soft, hard = r["digits"]["rows"]["soft labels"]["accuracy_top1"], r["digits"]["rows"]["hard labels only"]["accuracy_top1"]
    assert diff["mean"] == pytest.approx(sum(a - b for a, b in zip(soft, hard)) / 2)  # paired by seed
    sizes = r["bytes"]["rows"]
    assert sizes["5"]["raw_bytes_per_view"] == 5 * (2 + 2) + 4 and sizes["100"]["raw_bytes_per_view"] == 404
