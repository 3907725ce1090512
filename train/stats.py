"""Target statistics (count, mean, covariance), computed once per store and cached in it.

Stored in the store (``Store.write_stats``) as float64 arrays, so every student trained from the
store normalises its targets the same way. Taken over a seeded token sample (the quantizer's
sampler: first shards, uniform positions; codes are decoded first). A read-only store gets
them computed in memory.
"""
from __future__ import annotations

import logging

import numpy as np

from kdcache.quantize.sample import SampleSpec, draw, training_prefix
from kdcache.store import Store

log = logging.getLogger("kdcache.train")
STATS_TOKENS = 131072


def target_stats(store: Store, teacher: str, kind: str, *, tokens: int = STATS_TOKENS, seed: int = 0,
                 cache: bool = True) -> dict:
    """``cache``: write them into the store (rank 0 only; other ranks compute the same numbers
    from the same seeded sample, so nothing is written concurrently)."""
    stored = store.read_stats(teacher, kind)
    if stored is not None:
        return stored
    spec = SampleSpec(train_tokens=tokens, held_out=0, seed=seed, pool=1)
    shards, _ = training_prefix(store, teacher, kind, spec)
    x, _, desc = draw(store, teacher, kind, shards, spec)
    x = x.astype(np.float64)
    st = {"count": len(x), "mean": x.mean(0), "covariance": np.cov(x.T) if len(x) > 1 else np.eye(x.shape[1])}
    if not cache:
        return st
    try:
        Store.open(store.url, writable=True).write_stats(teacher, kind, mean=st["mean"], covariance=st["covariance"],
                                                         count=st["count"], attrs={"sampled_from": desc})
    except Exception as e:  # noqa: BLE001 - a shared read-only store is fine: keep them in memory
        log.warning("cannot cache target statistics in %s (%s); computed in memory", store.url, e)
    return st
