"""Training split by sample, with real ``torchrun`` processes (gloo): every key of the store exactly
once per epoch at 2 ranks x 2 workers, from one shard or from shards of 700/700/397 samples; a run
stopped mid-epoch and resumed at another world size and worker count delivers exactly the keys left."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import run_cli

from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.store import Store

pytestmark = pytest.mark.slow
STUDENT = "vit_tiny_patch16_224,img_size=16,depth=1,embed_dim=48,num_heads=2"
TEACHER = "t=resnet18,pretrained=false,img_size=16"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The 1,797 digit scans of scikit-learn as one shard, and as shards of 700, 700 and 397."""
    out = {}
    for name, size in (("one", 1797), ("three", 700)):
        d = tmp_path_factory.mktemp(name)
        corpus = str(d / "corpus")
        build_demo_corpus(corpus, digits=1797, photos=0, shard_size=size, digit_size=16)
        store = str(d / "s.zarr")
        run_cli("extract", corpus, "--out", store, "-t", TEACHER, "--batch-size", "256", "--workers", "0", "--no-progress")
        out[name] = (corpus, store)
    return out


def _train(run, corpus, store, *, world: int, workers: int, extra=()):
    args = ["train", "--store", store, "--data", corpus, "--student", STUDENT, "--out", str(run), "--epochs", "1",
            "--batch-size", "32", "--workers", str(workers), "--head-hidden", "16", "--log-every", "1", "--amp", "none",
            "--log-keys", "--last-batch", "drop", "--no-progress", *extra]
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "kdcache"]
            if world > 1 else [sys.executable, "-m", "kdcache"])
    p = subprocess.run([*head, *args], capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _keys(run) -> Counter:
    got = Counter()
    for path in (run / "keys").glob("rank*.jsonl"):
        for line in open(path):
            got.update(json.loads(line)["keys"])
    return got


def _store_keys(store) -> set[str]:
    s = Store.open(store)
    return {k for n in s.complete_shards() for k in s.keys(n).tolist()}


@pytest.mark.parametrize("which", ["one", "three"])
def test_every_key_once_an_epoch_at_two_ranks_and_two_workers(tmp_path, stores, which):
    corpus, store = stores[which]
    _train(tmp_path / "run", corpus, store, world=2, workers=2)
    got, want = _keys(tmp_path / "run"), _store_keys(store)
    # --last-batch drop: 1,797 = 28 x (2 ranks x 32) + 5; only those 5 are left out
    assert set(got.values()) == {1} and set(got) <= want and len(want) - len(got) == 1797 % 64 == 5
    epoch = json.loads(open(tmp_path / "run" / "epochs.jsonl").readline())
    assert (epoch["steps"], epoch["delivered"], epoch["dropped"], epoch["world"], epoch["workers"]) == (28, 1792, 5, 2, 2)
    rows = open(tmp_path / "run" / "metrics.csv").read().splitlines()
    assert len(rows) == 1 + 28


@pytest.mark.parametrize("before,after", [((2, 2), (1, 1)), ((1, 2), (2, 1))])
def test_a_run_stopped_mid_epoch_resumes_at_another_world_size_with_exactly_the_keys_left(tmp_path, stores, before, after):
    corpus, store = stores["three"]
    run = tmp_path / "run"
    _train(run, corpus, store, world=before[0], workers=before[1], extra=["--stop-at-step", "10"])
    first = _keys(run)
    assert sum(first.values()) == 10 * 32 * before[0] and set(first.values()) == {1}
    state = json.load(open(run / "checkpoints" / "last" / "state.json"))
    assert state["epoch"] == 0 and sum(e - s for s, e in state["remaining"]) == 1797 - 10 * 32 * before[0]
    p = _train(run, corpus, store, world=after[0], workers=after[1], extra=["--resume"])
    assert "samples of the epoch left" in p.stderr
    every = _keys(run)
    epoch = json.loads(open(run / "epochs.jsonl").readline())
    assert set(every.values()) == {1}, [k for k, c in every.items() if c > 1][:5]  # nothing delivered twice
    assert len(_store_keys(store)) - len(every) == epoch["dropped"] < after[0] * 32
    assert epoch["resumed_with"] == 1797 - 10 * 32 * before[0] and epoch["world"] == after[0]
    assert epoch["delivered"] == sum(every.values()) - sum(first.values())
