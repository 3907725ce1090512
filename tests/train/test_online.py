"""kdcache train --online: the teachers live, the same student, heads, losses and sample order.

The central check: the first online step equals a cached step when the store holds exactly the
views drawn online (the store's view 1 is online epoch 0's view; ``--view-choice augmented``)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from kdcache.train.fit import build_run
from kdcache.train.config import ConfigError, TrainConfig
from kdcache.train.fit import fit
from kdcache.train.trainer import to_device

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


def _cfg(out, corpus, **kw):
    base = dict(store="", data=corpus, student=STUDENT, out=str(out), epochs=1, batch_size=4, workers=0, lr=2e-3,
                warmup_steps=2, head_hidden=64, log_every=1, amp="none", normalize="none")
    return TrainConfig(**{**base, **kw})


def _first_step(run):
    run.source.dataset.set_epoch(0)
    batch = next(iter(run.loader()))
    trainer = run.trainer
    targets = trainer.decode(to_device(batch, trainer.device))
    loss, parts = trainer.step(batch)  # the trainer decodes the same batch again, and steps
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return batch, targets, loss, parts, grads


def test_first_online_step_equals_a_cached_step_on_the_same_views(tmp_path, vit_store, corpus, vit_spec):
    # full-size decodes on both sides, as the store was extracted: a reduced decode's scale depends on
    # the crops it serves (the online run cuts the teacher's crop too), so pixels agree only within a few levels
    online = build_run(_cfg(tmp_path / "online", corpus, online=True, teachers=(vit_spec,), decode="full"))
    cached = build_run(_cfg(tmp_path / "cached", corpus, store=vit_store, view_choice="augmented", decode="full"))
    for a, b in zip(online.trainer.model.state_dict().values(), cached.trainer.model.state_dict().values()):
        assert torch.equal(a, b)  # the same student and heads, whatever building the teacher drew
    b_on, t_on, loss_on, parts_on, g_on = _first_step(online)
    b_ca, t_ca, loss_ca, parts_ca, g_ca = _first_step(cached)
    assert b_on["key"] == b_ca["key"]  # the same samples in the same order
    assert torch.equal(b_on["image"], b_ca["image"])  # the same student pixels: the store's view 1
    assert (b_on["view"] == 1).all() and (b_ca["view"] == 1).all()
    for kind in ("summary", "patch"):  # live fp32 vs stored fp16
        torch.testing.assert_close(t_on["vit"][kind], t_ca["vit"][kind], rtol=2e-3, atol=2e-3)
    assert loss_on == pytest.approx(loss_ca, rel=1e-3)
    for k in parts_on:
        assert parts_on[k] == pytest.approx(parts_ca[k], rel=1e-3)
    assert float(torch.nn.functional.cosine_similarity(g_on, g_ca, dim=0)) > 0.999


def test_online_epochs_take_fresh_views_and_the_run_trains(tmp_path, corpus, vit_spec):
    cfg = _cfg(tmp_path / "run", corpus, online=True, teachers=(vit_spec,), epochs=3, normalize="standardize",
               online_stats_images=10)
    run = build_run(cfg)
    seen = {}
    for epoch in range(2):
        run.source.dataset.set_epoch(epoch)
        for s in run.source.dataset:
            seen.setdefault(s["key"], []).append((s["view"], s["input/vit"]))
    assert len(seen) == 24
    for views in seen.values():  # epoch e -> view e + 1, different pixels
        assert [v for v, _ in views] == [1, 2]
    assert sum(not torch.equal(a[1], b[1]) for a, b in seen.values()) >= 20
    result = fit(run, progress=False)
    assert result["steps"] == 3 * (24 // 4)
    with open(os.path.join(cfg.out, "metrics.csv")) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    prov = json.load(open(os.path.join(cfg.out, "provenance.json")))
    assert prov["online"] is True and prov["teachers"]["vit"]["dim"] == 192
    for kind in ("cls", "patch"):  # statistics from the teacher's features, kept for resume
        meta = json.load(open(os.path.join(cfg.out, "stats", f"vit.{kind}.json")))
        assert meta["source"]["images"] == 10
    from kdcache.eval.head_fidelity import fidelity  # against the live teacher on the eval view
    fid = fidelity(cfg.out)
    assert fid["store"].startswith("online") and len(fid["shards"]) == 3
    assert 0.0 < fid["teachers"]["vit"]["summary_cos"] <= 1.0 and 0.0 < fid["teachers"]["vit"]["patch_cos"] <= 1.0


def test_online_stats_equal_an_independent_computation(tmp_path, corpus, vit_spec):
    from kdcache.train.online import online_stats
    run = build_run(_cfg(tmp_path / "run", corpus, online=True, teachers=(vit_spec,)))
    teacher = run.trainer.targets["vit"].teacher
    st = online_stats(teacher, run.source.dataset, 6, seed=0)
    import dataclasses
    import itertools

    from kdcache.data.stream import SampleStream
    dataset = run.source.dataset  # the first six samples of epoch 0 in corpus order: the first shard's first six
    plain = SampleStream(dataclasses.replace(dataset.spec, shuffle=False, workers=0), dataset.corpus, places=dataset.places)
    first = list(itertools.islice(plain, 6))
    assert [s["key"] for s in first] == list(dataset.places[run.source.shards[0].name].keys[:6])
    crops = torch.stack([s["input/vit"] for s in first])
    summary, _ = teacher.features(crops)
    ref = summary.double().numpy()
    assert st["cls"]["count"] == 6
    np.testing.assert_allclose(st["cls"]["mean"], ref.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st["cls"]["covariance"], np.cov(ref.T), rtol=1e-5, atol=1e-6)


def test_online_resume_is_exact(tmp_path, corpus, vit_spec):
    kw = dict(online=True, teachers=(vit_spec,), epochs=2, normalize="standardize", online_stats_images=8)
    full = _cfg(tmp_path / "full", corpus, **kw)
    fit(build_run(full), progress=False)
    part = _cfg(tmp_path / "part", corpus, stop_at_step=7, **kw)
    fit(build_run(part), progress=False)
    fit(build_run(_cfg(tmp_path / "part", corpus, resume=True, **kw)), progress=False)
    from safetensors.torch import load_file
    a = load_file(os.path.join(full.out, "checkpoints", "last", "student.safetensors"))
    b = load_file(os.path.join(part.out, "checkpoints", "last", "student.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(teachers=()), "--online needs at least one --teacher"),
    (dict(teachers=("vit",)), "--teacher 'vit': expected NAME=MODEL"),
    (dict(store="s.zarr", teachers=("v=vit_tiny_patch16_224",)), "not --store"),
    (dict(teachers=("v=vit_tiny_patch16_224",), predict_codes=True), "--predict-codes reads a store"),
])
def test_online_config_errors(tmp_path, corpus, kw, message):
    with pytest.raises(ConfigError if "teacher '" not in message else Exception, match=message):
        _cfg(tmp_path / "r", corpus, online=True, **kw)


def test_cli_train_online(tmp_path, corpus, vit_spec, monkeypatch, capsys):
    from helpers import cli_call, one_error_line
    out = str(tmp_path / "run")
    code, text, err = cli_call(monkeypatch, capsys, "train", "--online", "--teacher", vit_spec, "--data", corpus, "--student",
                               STUDENT, "--out", out, "--epochs", "1", "--batch-size", "8", "--workers", "0",
                               "--online-stats-images", "8", "--no-progress")
    assert code == 0, err
    assert json.loads(text)["steps"] == 3
    assert json.load(open(os.path.join(out, "config.json")))["online"]["enabled"] is True
    code, _, err = cli_call(monkeypatch, capsys, "train", "--online", "--data", corpus, "--student", STUDENT, "--out",
                            str(tmp_path / "r2"))
    assert code == 2 and "--online needs at least one --teacher" in one_error_line(err)
