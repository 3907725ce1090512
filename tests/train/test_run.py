"""train.fit: the run directory is protected, loader workers persist across epochs
and still see each epoch, training shows progress."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import zarr

from kdcache.extract.options import ExtractOptions

from kdcache.extract.run import extract
from kdcache.store import KdcacheError, Store
from kdcache.train.fit import build_run
from kdcache.train.config import TrainConfig
from kdcache.data.partition import pick_view
from kdcache.train.fit import fit, train

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus, vit_spec):
    out = str(tmp_path_factory.mktemp("run") / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(views=3, progress=False, workers=0))
    return out


def _cfg(store, corpus, out, **kw):
    return TrainConfig(**{**dict(store=store, data=corpus, student=STUDENT, out=str(out), epochs=1, batch_size=4, workers=0,
                                 head_hidden=16, amp="none", log_every=1), **kw})


def test_a_directory_holding_a_run_needs_resume_or_overwrite(tmp_path, store, corpus):
    train(_cfg(store, corpus, tmp_path / "run"), progress=False)
    with pytest.raises(KdcacheError, match="holds a run already; pass --resume to continue it or --overwrite"):
        train(_cfg(store, corpus, tmp_path / "run"), progress=False)
    assert train(_cfg(store, corpus, tmp_path / "run", overwrite=True), progress=False)["steps"] == 6
    with pytest.raises(KdcacheError, match="--resume: no checkpoint"):
        train(_cfg(store, corpus, tmp_path / "empty", resume=True), progress=False)


def test_loader_workers_persist_across_epochs_and_see_each_epoch(tmp_path, store, corpus):
    run = build_run(_cfg(store, corpus, tmp_path / "run", workers=2, epochs=3))
    loader = run.loader()
    s = Store.open(store)  # each key's (shard, block): the unit a view is drawn for
    where = {k: (name, row // s.block_rows(name, "vit/patch")) for name in s.complete_shards()
             for row, k in enumerate(s.keys(name).tolist())}
    pids, seen = [], []
    for epoch in range(3):
        run.source.dataset.set_epoch(epoch)
        batches = list(iter(loader))
        assert len(batches) == run.epoch_steps[epoch]  # the step count comes from the loader's own split
        pids.append(sorted(w.pid for w in loader._iterator._workers))
        views = {k: int(v) for b in batches for k, v in zip(b["key"], b["view"])}
        assert views == {k: pick_view("epoch", 3, shard=where[k][0], block=where[k][1], epoch=epoch, seed=0) for k in views}
        seen.append(views)
    assert pids[0] == pids[1] == pids[2]  # the same worker processes
    assert seen[0] != seen[1]  # ... and they used the new epoch's views


def test_training_shows_progress_on_stderr(tmp_path, store, corpus, capsys):
    fit(build_run(_cfg(store, corpus, tmp_path / "run")), progress=True)
    err = capsys.readouterr().err
    assert "train" in err and "6/6" in err and "step" in err and "loss=" in err


def _tree(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("case", ["absent", "stale"])
def test_statistics_the_store_lacks_are_computed_into_the_run_directory_never_the_store(tmp_path, store, corpus, case):
    copy = str(tmp_path / "s.zarr")
    shutil.copytree(store, copy)
    fresh = Store.open(copy).read_stats("vit", "patch")
    if case == "absent":
        shutil.rmtree(os.path.join(copy, "stats"))
    else:  # the statistics claim to come from other data
        g = zarr.open_group(copy, mode="r+")["stats/vit/patch"]
        g.attrs.put({**g.attrs.asdict(), "digests": {"demo-000000": {"vit/patch": "0" * 64}}})
    before = _tree(copy)
    train(_cfg(copy, corpus, tmp_path / "run"), progress=False)
    assert _tree(copy) == before  # read-only
    got = safetensors.numpy.load_file(str(tmp_path / "run" / "stats" / "vit.patch.safetensors"))
    np.testing.assert_allclose(got["mean"], fresh["mean"], rtol=1e-12)  # the same seeded sample as the producer's
    np.testing.assert_allclose(got["covariance"], fresh["covariance"], rtol=1e-10)


@pytest.mark.parametrize("mistake,fix", [
    (["--student", "no_such_model"], ["--student", STUDENT]),
    (["--student", STUDENT + ",not_a_kwarg=3"], ["--student", STUDENT]),
    (["--teacher", "nope"], []),
])
def test_a_failed_run_never_blocks_its_corrected_rerun(tmp_path, store, corpus, monkeypatch, capsys, mistake, fix):
    from helpers import cli_call, one_error_line
    out = str(tmp_path / "run")
    base = ["train", "--store", store, "--data", corpus, "--out", out, "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--head-hidden", "16", "--no-progress"]
    student = [] if "--student" in mistake else ["--student", STUDENT]
    code, _, err = cli_call(monkeypatch, capsys, *base, *student, *mistake)
    assert code == 2 and one_error_line(err)
    assert not os.path.exists(out)  # nothing written: the run was never built
    code, stdout, err = cli_call(monkeypatch, capsys, *base, *(student or []), *fix)
    assert code == 0, err


@pytest.mark.parametrize("mistake", ["vit=no_such_model", "vit=vit_tiny_patch16_224,pretrained=false,img_size=32,depth=2,bad=1",
                                     "vit=vit_tiny_patch16_224,checkpoint=/no/such.safetensors", "DUP"])
def test_a_failed_online_run_never_blocks_its_corrected_rerun(tmp_path, corpus, vit_spec, monkeypatch, capsys, mistake):
    from helpers import cli_call, one_error_line
    out = str(tmp_path / "run")
    base = ["train", "--online", "--data", corpus, "--student", STUDENT, "--out", out, "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--head-hidden", "16", "--online-stats-images", "4", "--no-progress"]
    teachers = ["--teacher", vit_spec, "--teacher", vit_spec] if mistake == "DUP" else ["--teacher", mistake]
    code, _, err = cli_call(monkeypatch, capsys, *base, *teachers)
    assert code == 2 and one_error_line(err)
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    code, _, err = cli_call(monkeypatch, capsys, *base, "--teacher", vit_spec)
    assert code == 0, err


def test_a_run_that_never_checkpointed_is_restarted_in_place(tmp_path, store, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a killed first epoch leaves
    (out / "skipped.jsonl").write_text('{"epoch": 0, "shard": "x", "error": "stale", "samples_skipped": 9}\n')
    r = train(_cfg(store, corpus, out), progress=False)
    assert r["steps"] == 6 and r["skipped"]["shards"] == []  # the stale records are gone
    with pytest.raises(KdcacheError, match="is finished .*nothing to train"):
        train(_cfg(store, corpus, out, resume=True), progress=False)


def test_a_run_directory_travels(tmp_path, store, corpus, monkeypatch, capsys):
    import json
    import subprocess
    import sys

    from helpers import cli_call
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(store, work / "s.zarr")
    monkeypatch.chdir(work)  # relative paths, as a user types them
    code, _, err = cli_call(monkeypatch, capsys, "train", "--store", "s.zarr", "--data", os.path.relpath(corpus, work),
                            "--student", STUDENT, "--out", "run", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                            "--head-hidden", "16", "--no-progress")
    assert code == 0, err
    cfg = json.load(open(work / "run" / "config.json"))
    assert all(os.path.isabs(p) for p in (cfg["store"], cfg["data"]["corpus"], cfg["out"]))
    shutil.move(str(work / "run"), str(tmp_path / "moved"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli_call(monkeypatch, capsys, "report", "../moved", "--json")
    assert code == 0 and json.loads(out)["knn"], err
    code, out, err = cli_call(monkeypatch, capsys, "export", "../moved")
    line = json.loads(out)["load_with"]
    assert code == 0 and str(tmp_path / "moved") in line, line
    p = subprocess.run([sys.executable, "-c", f"import timm; m = {line}; print(type(m).__name__)"], capture_output=True,
                       text=True, cwd=str(tmp_path), timeout=300)  # yet another directory
    assert p.returncode == 0 and p.stdout.strip() == "VisionTransformer", p.stderr[-2000:]


def test_a_resume_refuses_a_store_that_changed_and_a_position_past_the_epoch(tmp_path, store, corpus):
    """The run's plan (shards, counts, digests) is kept; a resume on a changed store is one line
    naming the shard and what changed; a checkpoint position past the epoch's end is refused."""
    import json
    copy = str(tmp_path / "s.zarr")
    shutil.copytree(store, copy)
    out = tmp_path / "run"
    train(_cfg(copy, corpus, out, epochs=2, stop_at_step=3), progress=False)
    state = out / "checkpoints" / "last" / "state.json"
    position = json.loads(state.read_text())
    assert position["epoch"] == 0 and sum(e - s for s, e in position["remaining"]) == 24 - 3 * 4
    plan = json.loads((out / "plan.json").read_text())
    assert [s[:2] for s in plan["shards"]] == [[n, 8] for n in Store.open(copy).complete_shards()]
    g = zarr.open_group(copy, mode="r+")["shards/demo-000001"]
    attrs = g.attrs.asdict()
    from kdcache.store.layout import sealed  # rewritten since the checkpoint (and bound anew, as a writer binds it)
    g.attrs.put(sealed("demo-000001", {**attrs, "digest": {**attrs["digest"], "vit/cls": "0" * 64}}))
    with pytest.raises(KdcacheError, match=r"shard demo-000001: its digests are not those the run was planned with"):
        train(_cfg(copy, corpus, out, epochs=2, resume=True), progress=False)
    g.attrs.put(attrs)
    state.write_text(json.dumps({**position, "remaining": [[20, 30]]}))
    with pytest.raises(KdcacheError, match=r"position \[20, 30\) is past the end of the epoch \(24 samples\)"):
        train(_cfg(copy, corpus, out, epochs=2, resume=True), progress=False)
    state.write_text(json.dumps(position))
    r = train(_cfg(copy, corpus, out, epochs=2, resume=True), progress=False)
    assert r["steps"] == 12
    epochs = [json.loads(line) for line in open(out / "epochs.jsonl")]
    assert [(e["epoch"], e["delivered"], e["resumed_with"], e["steps"]) for e in epochs] == [(0, 12, 12, 3), (1, 24, None, 6)]
    from kdcache.eval.report import report
    rows = report(str(out), knn=False)["epochs"]
    text = open(out / "report" / "report.md").read()
    assert [e["epoch"] for e in rows] == [0, 1] and "## Epochs" in text and "| 1 | 1 x 1 | 6 | 24 | 24 | 0 | 0 | 0 | - |" in text


def test_the_progress_bar_counts_the_steps_a_resume_has_left(tmp_path, store, corpus, capsys):
    out = tmp_path / "run"
    train(_cfg(store, corpus, out, epochs=2, stop_at_step=4), progress=False)
    fit(build_run(_cfg(store, corpus, out, epochs=2, resume=True)), progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err and "4/12" in err
