"""Soft labels: a classifier teacher's top-K logits cached per view (against timm run directly), the
KL loss (against an independent computation), students that learn them, export, eval accuracy."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from conftest import VIT
from helpers import cli_call, one_error_line, tar_images
from torchvision.transforms import InterpolationMode

from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.train.config import TrainConfig
from kdcache.train.fit import train
from kdcache.train.losses import soft_label_loss

STUDENT = "resnet18,img_size=32"
OPTS = dict(progress=False, workers=0, batch_size=5, decode="full")  # full: compared with timm on full-size decodes


@pytest.fixture(scope="module")
def soft_store(tmp_path_factory, corpus, vit_spec):
    """The ViT teacher (a 1000-class head) with its top-10 logits, float32 so they compare exactly."""
    out = str(tmp_path_factory.mktemp("soft") / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(views=2, seed=3, dtype="float32", logits=10, **OPTS))
    return out


def _teacher_logits(weights, image, view, meta):
    """The teacher run directly with timm (its full head) on the crop a stored view describes."""
    m = timm.create_model(VIT["model"], pretrained=False, img_size=32, depth=2)
    m.load_state_dict(safetensors.torch.load_file(weights["vit"]))
    m.eval()
    h, w = image.shape[:2]
    t, l, ch, cw, flip = view
    x = torch.from_numpy(image).permute(2, 0, 1)
    x = TF.resized_crop(x, round(t * h), round(l * w), round(ch * h), round(cw * w), list(meta["input_size"][1:]),
                        interpolation=InterpolationMode(meta["interpolation"]), antialias=True)
    if flip >= 0.5:
        x = x.flip(-1)
    x = (x.float()[None] / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return m(x)[0]


def test_stored_top_k_and_log_sum_exp_equal_timm_and_torch(soft_store, corpus, weights):
    root = zarr.open_group(soft_store, mode="r")
    meta = root.attrs["kdcache"]["teachers"]["vit"]
    assert meta["logits"] == {"k": 10, "classes": 1000, "index_dtype": "uint16"}
    checked = 0
    for tar in sorted(glob.glob(os.path.join(corpus, "*.tar"))):
        images = tar_images(tar)
        g = root[f"shards/{os.path.basename(tar)[:-4]}"]
        assert g["vit/logits_values"].shape == (8, 2, 10) and g["vit/logits_indices"].dtype == np.uint16
        keys = list(g["keys"][:])
        for i in (0, len(keys) - 1):
            for v in range(2):
                logits = _teacher_logits(weights, images[keys[i]], g["views"][i, v], meta)
                values, indices = torch.topk(logits, 10)
                np.testing.assert_allclose(g["vit/logits_values"][i, v], values.numpy(), rtol=1e-4, atol=1e-4)
                np.testing.assert_array_equal(g["vit/logits_indices"][i, v].astype(np.int64), indices.numpy())
                np.testing.assert_allclose(g["vit/logits_lse"][i, v], torch.logsumexp(logits, 0).item(), rtol=1e-5)
                checked += 1
    assert checked == 12


def test_logits_need_a_head_and_at_most_its_classes(tmp_path, corpus, weights, monkeypatch, capsys):
    headless = f"vit={VIT['model']},pretrained=false,img_size=32,depth=2,num_classes=0"
    for spec, k, match in ((headless, 5, "has no classifier head"),
                           (f"vit={VIT['model']},pretrained=false,img_size=32,depth=2,num_classes=7", 8,
                            "--logits 8: more than its 7 classes")):
        out = str(tmp_path / f"s{k}.zarr")
        code, _, err = cli_call(monkeypatch, capsys, "extract", corpus, "-o", out, "-t", spec, "--logits", str(k),
                                "--no-progress", "--workers", "0")
        assert code == 2 and match in one_error_line(err) and not os.path.exists(out)


def _full_kl(p_logits: np.ndarray, q_logits: np.ndarray, t: float) -> float:
    p = np.exp(p_logits / t - np.logaddexp.reduce(p_logits / t))
    log_q = q_logits / t - np.logaddexp.reduce(q_logits / t)
    return float(t * t * (p * (np.log(p) - log_q)).sum())


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_kl_equals_an_independent_computation_of_the_distribution_the_store_implies(t):
    rng = np.random.default_rng(0)
    c, k = 12, 4
    teacher, student = rng.standard_normal(c) * 3, rng.standard_normal(c)
    top = np.argsort(-teacher)[:k]
    lse = np.logaddexp.reduce(teacher)
    target = {"values": torch.tensor(teacher[top])[None], "indices": torch.tensor(top)[None], "lse": torch.tensor([lse])}
    s = torch.tensor(student)[None]
    # spread: the top-K probabilities as stored, the rest of the mass evenly on the other classes
    p1 = np.full(c, (1 - np.exp(teacher[top] - lse).sum()) / (c - k))
    p1[top] = np.exp(teacher[top] - lse)
    assert soft_label_loss(s, target, temperature=t, tail="spread").item() == pytest.approx(_full_kl(np.log(p1), student, t),
                                                                                             rel=1e-6)
    # renorm: the top K only, renormalised at T
    pt = np.exp(teacher[top] / t - np.logaddexp.reduce(teacher[top] / t))
    log_q = student / t - np.logaddexp.reduce(student / t)
    want = t * t * (pt * (np.log(pt) - log_q[top])).sum()
    assert soft_label_loss(s, target, temperature=t, tail="renorm").item() == pytest.approx(want, rel=1e-6)
    # a live teacher: the full distribution
    full = {"full": torch.tensor(teacher)[None]}
    assert soft_label_loss(s, full, temperature=t).item() == pytest.approx(_full_kl(teacher, student, t), rel=1e-6)


def test_kl_is_zero_when_the_student_says_what_the_teacher_said():
    rng = np.random.default_rng(1)
    c, k = 10, 3
    z = torch.tensor(rng.random((5, c)) * 2 + 1)  # positive: a tail set to 0 stays below the top K
    assert soft_label_loss(z, {"full": z}).item() == pytest.approx(0, abs=1e-6)  # (fp32)
    values, indices = z.topk(c)  # every class stored: exact
    target = {"values": values, "indices": indices, "lse": torch.logsumexp(z, -1)}
    assert soft_label_loss(z, target, temperature=3.0).item() == pytest.approx(0, abs=1e-6)
    flat = z.clone()  # a teacher whose tail is even: spread is exact
    order = flat.argsort(-1, descending=True)
    flat.scatter_(-1, order[:, k:], 0.0)
    values, indices = flat.topk(k)
    target = {"values": values, "indices": indices, "lse": torch.logsumexp(flat, -1)}
    for t in (1.0, 2.0):
        assert soft_label_loss(flat, target, temperature=t, tail="spread").item() == pytest.approx(0, abs=1e-6)


def _cfg(store, corpus, out, **kw):
    return TrainConfig(**{**dict(store=store, data=corpus, student=STUDENT, out=str(out), epochs=4, batch_size=4, workers=0,
                                 head_hidden=16, lr=3e-3, warmup_steps=2, log_every=1, logits_loss="kl"), **kw})


def test_a_student_learns_the_soft_labels_and_exports_its_classifier(tmp_path, soft_store, corpus, monkeypatch, capsys):
    run = str(tmp_path / "run")
    r = train(_cfg(soft_store, corpus, run, temperature=2.0, summary_weight=0.0, patch_weight=0.0), progress=False)
    rows = list(__import__("csv").DictReader(open(os.path.join(run, "metrics.csv"))))
    kl = [float(row["vit/logits"]) for row in rows]
    assert r["steps"] == 24 and np.mean(kl[-4:]) < 0.8 * np.mean(kl[:4]), kl
    prov = json.load(open(os.path.join(run, "provenance.json")))
    assert prov["student"]["timm_kwargs"]["num_classes"] == 1000 and prov["method"]["logits_loss"] == "kl"
    code, out, err = cli_call(monkeypatch, capsys, "export", run)
    line = json.loads(out)["load_with"]
    assert code == 0 and "num_classes=1000" in line
    p = subprocess.run([sys.executable, "-c", f"import timm, torch; m = {line}.eval(); "
                        f"print(m(torch.zeros(1, 3, 32, 32)).shape[-1])"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "1000", p.stderr[-2000:]
    code, out, err = cli_call(monkeypatch, capsys, "eval", "accuracy", "--run", run, "--data", corpus, "--json")
    a = json.loads(out)
    assert code == 0 and a["images"] == 24 and a["classes"] == 1000 and 0 <= a["agreement"]["top1"] <= 1, err
    assert a["agreement"]["mean_kl"] >= 0 and a["student_accuracy"]["top1"] <= a["student_accuracy"]["top5"]


def test_labels_alone_and_with_soft_labels_and_what_is_refused(tmp_path, soft_store, corpus, vit_store):
    both = train(_cfg(soft_store, corpus, tmp_path / "both", label_loss="ce", label_weight=0.5, epochs=1), progress=False)
    cols = list(__import__("csv").DictReader(open(tmp_path / "both" / "metrics.csv")))[0]
    assert both["steps"] == 6 and {"vit/logits", "labels"} <= set(cols)
    from kdcache.errors import KdcacheError
    with pytest.raises(KdcacheError, match="--label-loss .* goes with --logits-loss kl"):
        _cfg(soft_store, corpus, tmp_path / "x", logits_loss="none", label_loss="ce")
    with pytest.raises(KdcacheError, match="no teacher in .* gives soft labels .*--logits K"):
        train(_cfg(vit_store, corpus, tmp_path / "y"), progress=False)


def test_mgda_weighs_the_soft_labels_as_one_more_objective(tmp_path, soft_store, corpus):
    train(_cfg(soft_store, corpus, tmp_path / "m", balance="mgda", epochs=1), progress=False)
    rows = list(__import__("csv").DictReader(open(tmp_path / "m" / "metrics.csv")))
    for row in rows:
        w = float(row["weight/vit"]) + float(row["weight/logits/vit"])
        assert w == pytest.approx(2.0, abs=1e-6)  # n * alphas on the simplex


def test_online_distillation_learns_the_live_teachers_full_distribution(tmp_path, corpus, vit_spec):
    out = tmp_path / "online"
    r = train(TrainConfig(store="", online=True, teachers=(vit_spec,), data=corpus, student=STUDENT, out=str(out), epochs=1,
                          batch_size=4, workers=0, head_hidden=16, online_stats_images=8, logits_loss="kl",
                          temperature=2.0), progress=False)
    rows = list(__import__("csv").DictReader(open(out / "metrics.csv")))
    assert r["steps"] == 6 and all(math.isfinite(float(row["vit/logits"])) for row in rows)
    assert json.load(open(out / "provenance.json"))["student"]["timm_kwargs"]["num_classes"] == 1000
