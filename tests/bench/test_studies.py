"""kdcache bench quality / bench teachers run end to end on a tiny corpus and print every column."""
from __future__ import annotations

import json
import os

import pytest

from helpers import cli_call

from kdcache.eval.model_features import probe_model


def test_bench_quality_compares_every_variant_at_equal_steps(tmp_path, corpus, vit_spec, monkeypatch, capsys):
    out = str(tmp_path / "q")
    args = ["bench", "quality", "--out", out, "--data", corpus, "--teacher", vit_spec, "--student", "resnet18,img_size=32",
            "--epochs", "2", "--batch-size", "4", "--views", "1,8", "--quantized-views", "8", "--fractions", "16",
            "--methods", "pq", "--train-tokens", "256", "--workers", "0"]
    code, text, err = cli_call(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "| variant | KiB/view stored | fit s | online fit s / this | kNN top-1 | top-5 | vs online | vs fp16 same K |" in text
    for row in ("| online |", "| fp16 K=1 |", "| fp16 K=8 |", "| pq 1/16 K=8 |", "| pq 1/16 K=8, --predict-codes |",
                "| random-init student |", "| teacher, cached features |"):
        assert row in text
    r = json.load(open(os.path.join(out, "quality.json")))
    assert r["steps"] == 2 * (24 // 4)  # every variant the same optimizer steps
    rows = {row["variant"]: row for row in r["rows"]}
    # each row's kNN is the run's own evaluation
    assert rows["fp16 K=8"]["top1"] == probe_model("run", corpus, run=rows["fp16 K=8"]["run"])["top1"]
    assert rows["pq 1/16 K=8"]["vs_fp16_same_k"] == rows["pq 1/16 K=8"]["top1"] / rows["fp16 K=8"]["top1"]
    assert rows["pq 1/16 K=8"]["bytes_per_view"] < rows["fp16 K=8"]["bytes_per_view"]
    json.load(open(os.path.join(rows["online"]["run"], "provenance.json")))["online"]
    # a second run reuses every store and run
    code, again, err = cli_call(monkeypatch, capsys, *args)
    assert code == 0 and again == text


def test_bench_teachers_prints_knn_and_per_teacher_fidelity(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "t")
    code, text, err = cli_call(monkeypatch, capsys, "bench", "teachers", "--out", out, "--digits", "24", "--photos", "0",
                               "--epochs", "1", "--batch-size", "8", "--vit-epochs", "1", "--variant", "static weights",
                               "--variant", "--balance mgda")
    assert code == 0, err
    assert "| variant | kNN top-1 | top-5 | effnet summary | effnet patch | vit summary | vit patch | fit s |" in text
    for row in ("| static weights |", "| --balance mgda |", "| teacher effnet, cached |", "| teacher vit, cached |"):
        assert row in text
    r = json.load(open(os.path.join(out, "teachers.json")))
    for row in r["rows"]:
        for t in ("effnet", "vit"):
            assert -1 <= row["fidelity"][t]["summary"] <= 1 and -1 <= row["fidelity"][t]["patch"] <= 1
    cfg = json.load(open(os.path.join(out, "run-balance-mgda", "config.json")))
    assert cfg["balance"] == "mgda"


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
