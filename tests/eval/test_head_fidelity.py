"""eval fidelity: a run rebuilt read-only, its heads against the cached targets."""
from __future__ import annotations

import json
import os

from helpers import cli_call

from kdcache.train.config import TrainConfig
from kdcache.train.fit import train


def test_fidelity_of_a_trained_run_is_high_and_writes_nothing(tmp_path, vit_store, corpus, monkeypatch, capsys):
    run = str(tmp_path / "run")
    train(TrainConfig(store=vit_store, data=corpus, student="vit_tiny_patch16_224,img_size=32,depth=1", out=run, epochs=8,
                      batch_size=4, workers=0, head_hidden=64, lr=3e-3, warmup_steps=2, amp="none"), progress=False)
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(run) for f in fs}
    code, out, err = cli_call(monkeypatch, capsys, "eval", "fidelity", "--run", run, "--json")
    r = json.loads(out)
    v = r["teachers"]["vit"]
    assert code == 0 and r["shards"] == ["demo-000000", "demo-000001", "demo-000002"], err
    assert v["summary_cos"] > 0.3 and v["patch_cos"] > 0.5 and v["summary_cos_teacher_space"] > 0.7, v  # untrained heads: ~0
    assert {f: os.path.getmtime(os.path.join(r_, f)) for r_, _, fs in os.walk(run) for f in fs} == before
    code, out, _ = cli_call(monkeypatch, capsys, "eval", "fidelity", "--run", run, "--shards", "demo-000002", "--json")
    assert code == 0 and json.loads(out)["shards"] == ["demo-000002"]
