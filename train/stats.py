"""Target statistics for a run: the store's when they are fresh, else computed here.

A store opened for training is read-only. Statistics written by its producers are used when
their recorded source digests match the arrays the store holds now; otherwise (none written,
or stale) they are computed in memory from the same seeded sample and kept in the run
directory (``RUN/stats/``), so a resumed run normalises exactly as before. With
``--skip-corrupt`` a sampled shard that fails verification is left out of the sample.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import safetensors.numpy

from kdcache.quantize.stats import compute_stats, is_fresh
from kdcache.store import CorruptShardError, Store

from .rundir import RunDir

log = logging.getLogger("kdcache.train")


def target_stats(store: Store, teacher: str, kind: str, *, shards: list[str] | None = None, rundir: RunDir | None = None,
                 write: bool = False, skip_corrupt: bool = False) -> dict:
    """``shards``: the ones the run may read (default: every complete one); ``write``: keep
    computed statistics in the run directory (rank 0)."""
    st = store.read_stats(teacher, kind)
    if st is not None and is_fresh(store, teacher, kind, st["attrs"]):
        return st
    cached = load_run_stats(rundir, teacher, kind)
    if cached is not None and is_fresh(store, teacher, kind, cached["source"]):
        return cached
    log.info("teacher %s %s: %s statistics in %s; computing them for this run", teacher, kind,
             "stale" if st is not None else "no", store.url)
    excluded: list[str] = []
    while True:
        try:
            st = compute_stats(store, teacher, kind, shards=shards, exclude=excluded)
            break
        except CorruptShardError as e:
            bad = _shard_of(str(e), store)
            if not skip_corrupt or bad is None or bad in excluded:
                raise
            log.warning("statistics: leaving out corrupt shard %s", bad)
            excluded.append(bad)
    if write and rundir is not None:
        save_run_stats(rundir, teacher, kind, st)
    return st


def _shard_of(message: str, store: Store) -> str | None:
    for name in store.shard_names():
        if f"shard {name}:" in message:
            return name
    return None


def _paths(rundir: RunDir, teacher: str, kind: str) -> tuple[str, str]:
    base = os.path.join(rundir.file("stats"), f"{teacher}.{kind}")
    return base + ".safetensors", base + ".json"


def save_run_stats(rundir: RunDir, teacher: str, kind: str, st: dict) -> None:
    arrays, meta = _paths(rundir, teacher, kind)
    os.makedirs(os.path.dirname(arrays), exist_ok=True)
    safetensors.numpy.save_file({"mean": st["mean"], "covariance": st["covariance"]}, arrays)
    with open(meta, "w") as f:
        json.dump({"count": st["count"], "source": st["source"]}, f)


def load_run_stats(rundir: RunDir | None, teacher: str, kind: str) -> dict | None:
    if rundir is None:
        return None
    arrays, meta = _paths(rundir, teacher, kind)
    if not (os.path.exists(arrays) and os.path.exists(meta)):
        return None
    t = safetensors.numpy.load_file(arrays)
    with open(meta) as f:
        m = json.load(f)
    if not (np.isfinite(t["mean"]).all() and np.isfinite(t["covariance"]).all()):
        return None
    return {"count": m["count"], "mean": t["mean"], "covariance": t["covariance"], "source": m["source"]}
