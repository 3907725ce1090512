"""Crash safety and scale with real processes: SIGKILL at random points, torchrun with 2 ranks."""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from helpers import assert_same_store, store_arrays

from helpers import verify_store

pytestmark = pytest.mark.slow
ARGS = ["--views", "2", "--batch-size", "2", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, many_shards, vit_spec, cnn_spec):
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    run_cli("extract", many_shards, "--out", out, "-t", vit_spec, "-t", cnn_spec, *ARGS)
    return out


def _kill_randomly(cmd, out, seed, times=4):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rng = random.Random(seed)
    kills = 0
    for _ in range(times):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not glob.glob(os.path.join(out, "shards", "*", "*", "patch")):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    return kills


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, many_shards, vit_spec, cnn_spec, reference):
    out = str(tmp_path / "killed.zarr")
    cmd = [sys.executable, "-m", "kdcache", "extract", many_shards, "--out", out, "-t", vit_spec, "-t", cnn_spec, *ARGS]
    assert _kill_randomly(cmd, out, 1234) >= 2
    run_cli("extract", many_shards, "--out", out, "-t", vit_spec, "-t", cnn_spec, *ARGS)
    assert_same_store(reference, out)
    arrays = store_arrays(out)
    keys = [k for name in sorted(arrays) if name.endswith("/keys") for k in arrays[name].tolist()]
    assert len(keys) == 36 and len(set(keys)) == 36  # nothing lost, nothing duplicated
    assert verify_store(out, many_shards).problems == []


def test_torchrun_two_ranks_equals_one_process(tmp_path, many_shards, vit_spec, cnn_spec, reference):
    out = str(tmp_path / "ddp.zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcache",
           "extract", many_shards, "--out", out, "-t", vit_spec, "-t", cnn_spec, *ARGS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0/2: 3 shard(s) to write" in p.stderr and "rank 1/2: 3 shard(s) to write" in p.stderr
    assert_same_store(reference, out)


def test_slurm_style_ranks_split_shards_without_overlap(tmp_path, many_shards, vit_spec, cnn_spec, reference):
    out = str(tmp_path / "slurm.zarr")
    for rank in (1, 0, 2):  # any order, as array jobs start
        p = run_cli("extract", many_shards, "--out", out, "-t", vit_spec, "-t", cnn_spec, *ARGS,
                    "--rank", str(rank), "--world-size", "3")
        assert "rank %d/3: 2 shard(s) to write" % rank in p.stderr
    assert_same_store(reference, out)


def test_sigkill_during_quantized_extraction_then_resume_equals_uninterrupted(tmp_path, many_shards, vit_spec):
    q = ["--views", "4", "--batch-size", "2", "--workers", "1", "--no-progress",
         "--quantize", "pq:M=12", "--quantize-sample", "256", "--quantize-pool", "1"]
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "killed.zarr")
    run_cli("extract", many_shards, "--out", ref, "-t", vit_spec, *q)
    cmd = [sys.executable, "-m", "kdcache", "extract", many_shards, "--out", out, "-t", vit_spec, *q]
    _kill_randomly(cmd, out, 99)
    run_cli("extract", many_shards, "--out", out, "-t", vit_spec, *q)
    assert_same_store(ref, out)
    arrays = store_arrays(out)
    assert not [k for k in arrays if k.endswith("vit/patch")] and len([k for k in arrays if k.endswith("patch_codes")]) == 6
    import zarr
    import numpy as np
    a, b = zarr.open_group(ref)["quantizers/vit/patch"], zarr.open_group(out)["quantizers/vit/patch"]
    np.testing.assert_array_equal(a["codebooks"][:], b["codebooks"][:])
    assert len(a.attrs["trained_on"]["shards"]) == 3  # 3 shards trained in float, 3 encoded as extracted


def test_torchrun_two_rank_training(tmp_path, many_shards, reference):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcache", "train",
           "--store", reference, "--data", many_shards, "--student", "vit_tiny_patch16_224,img_size=32,depth=1",
           "--out", str(run), "--epochs", "2", "--batch-size", "4", "--workers", "1", "--head-hidden", "32",
           "--log-every", "1", "--amp", "none"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    import csv
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    # 36 samples split by sample: 18 a rank -> 4 batches of 4 and one of 2 per epoch (--last-batch partial); 2 epochs
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert (run / "checkpoints" / "last" / "student.safetensors").exists() and (run / "loss.png").exists()


def _torchrun_train(run, store, data, *options):
    """``kdcache train`` of one epoch under 2 torchrun ranks (gloo), every step logged; later options win."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcache", "train",
           "--store", store, "--data", data, "--student", "vit_tiny_patch16_224,img_size=32,depth=1", "--out", str(run),
           "--epochs", "1", "--batch-size", "4", "--workers", "1", "--head-hidden", "32", "--log-every", "1",
           "--amp", "none", *options]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]


def test_torchrun_two_ranks_with_mgda_teacher_drop_and_task_loss(tmp_path, many_shards, reference):
    """Every rank runs the same collectives (the Gram matrix and the mean losses are all-reduced):
    no rank hangs, and the logged weights are valid."""
    run = tmp_path / "run"
    _torchrun_train(run, reference, many_shards, "--balance", "mgda", "--teacher-drop", "0.5", "--task-loss", "ce")
    import csv
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 6))
    for r in rows:
        w = [float(r[f"weight/{o}"]) for o in ("vit", "cnn", "task")]
        assert min(w) >= 0 and 0 < sum(w) <= 3 + 1e-6


def test_torchrun_two_ranks_with_model_tokens_ladder_frozen_backbone_and_dto(tmp_path, many_shards, reference):
    """The second round of multi-teacher methods together under 2 ranks: the DTO-KD Gram matrix
    all-reduced (both ranks take the same weights), a frozen backbone unchanged on every rank."""
    import csv

    import safetensors.torch
    import timm
    import torch
    torch.manual_seed(3)
    backbone = str(tmp_path / "backbone.safetensors")
    safetensors.torch.save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                                  depth=1).state_dict(), backbone)
    run = tmp_path / "run"
    _torchrun_train(run, reference, many_shards, "--student", f"vit_tiny_patch16_224,img_size=32,depth=1,checkpoint={backbone}",
                    "--head-heads", "2", "--head", "model-token", "--head-depth", "1", "--ladder", "0", "--frozen-backbone",
                    "--adapter-rank", "2", "--balance", "dto", "--task-loss", "ce")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 6))
    for r in rows:
        assert float(r["weight/task"]) / 2 + float(r["weight/vit"]) / 2 == pytest.approx(1.0, abs=1e-6)
    kept = safetensors.torch.load_file(str(run / "checkpoints" / "last" / "backbone.safetensors"))
    original = safetensors.torch.load_file(backbone)
    assert all(torch.equal(kept[k], original[k]) for k in original)


@pytest.mark.parametrize("trial", range(3))
def test_two_jobs_on_the_same_store_split_the_shards_by_lease(tmp_path, many_shards, vit_spec, cnn_spec, reference, trial):
    out = str(tmp_path / "twice.zarr")
    cmd = [sys.executable, "-m", "kdcache", "extract", many_shards, "--out", out, "-t", vit_spec, "-t", cnn_spec, *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    jobs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [j.communicate(timeout=300) for j in jobs]
    for j, (stdout, stderr) in zip(jobs, results):
        assert j.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    written = [int(stdout.split(" into ")[1].split(" shards")[0]) for stdout, _ in results]
    assert sum(written) >= 6  # every shard written by exactly one job (a rewrite of a finished one is also fine)
    assert_same_store(reference, out)
    assert not glob.glob(os.path.join(out, "leases", "*.json"))  # every lease released


QUANTIZE = ["-t", "vit", "--method", "rq", "--bytes-per-token", "9", "--norm", "--beam", "8", "--sample-tokens", "256", "--no-progress"]


def _all_arrays(path) -> dict:
    """Every array of the store (shards, quantizers, statistics) and every quantizer's attributes."""
    import zarr
    import numpy as np
    root = zarr.open_group(path, mode="r")
    out = {p: np.asarray(a[:]) for p, a in root.members(max_depth=None) if isinstance(a, zarr.Array)}
    out.update({f"{p}@attrs": {k: v for k, v in g.attrs.items() if k != "train_seconds"}
                for p, g in root.members(max_depth=None) if p.startswith("quantizers/") and "ready" in g.attrs})
    return out


def _assert_same_arrays(a, b):
    import numpy as np
    xa, xb = _all_arrays(a), _all_arrays(b)
    assert sorted(xa) == sorted(xb), sorted(set(xa) ^ set(xb))
    for k in xa:
        if k.endswith("@attrs"):
            assert xa[k] == xb[k], k
        else:
            np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


@pytest.fixture(scope="module")
def quantized_reference(tmp_path_factory, reference):
    import shutil
    out = str(tmp_path_factory.mktemp("qref") / "q.zarr")
    shutil.copytree(reference, out)
    run_cli("quantize", out, *QUANTIZE)
    return out


def _coded_shards(out) -> int:
    import json
    n = 0
    for f in glob.glob(os.path.join(out, "shards", "*", "zarr.json")):
        with open(f) as fh:
            n += "vit/patch_codes" in json.load(fh).get("attributes", {}).get("digest", {})
    return n


def test_torchrun_two_rank_quantize_equals_one_process(tmp_path, reference, quantized_reference):
    import json
    import shutil
    out = str(tmp_path / "q2.zarr")
    shutil.copytree(reference, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcache",
           "quantize", out, *QUANTIZE]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    reports = [json.loads("{" + part) for part in p.stdout.split("{")[1:]]
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert sum(r["shards_converted"] for r in reports) == 6  # every shard converted by exactly one rank
    _assert_same_arrays(quantized_reference, out)
    assert not glob.glob(os.path.join(out, "leases", "*.json"))


def test_quantize_rank_zero_alone_takes_the_shards_of_a_rank_that_never_came(tmp_path, reference, quantized_reference):
    import shutil
    out = str(tmp_path / "q.zarr")
    shutil.copytree(reference, out)
    run_cli("quantize", out, *QUANTIZE, "--rank", "0", "--world-size", "2")
    _assert_same_arrays(quantized_reference, out)


def test_sigkilled_quantize_resumes_to_an_identical_store(tmp_path, reference, quantized_reference):
    """Killed after 1 and after 3 shards have their codes (mid-way through the next one), then
    resumed: the same arrays, codebooks and statistics as an uninterrupted run."""
    import shutil
    out = str(tmp_path / "killed.zarr")
    shutil.copytree(reference, out)
    cmd = [sys.executable, "-m", "kdcache", "quantize", out, *QUANTIZE]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    partial = []
    for after in (1, 3):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and _coded_shards(out) < after:
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        partial.append(_coded_shards(out))
    assert any(0 < n < 6 for n in partial), partial  # at least one kill left a half-converted store
    run_cli("quantize", out, *QUANTIZE)
    _assert_same_arrays(quantized_reference, out)
    assert verify_store(out).problems == []
