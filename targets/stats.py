"""Normalisation statistics of a teacher's targets (count, mean, covariance), with their source.

The one statistics module, whoever computes them:

- **from a store** (``compute_stats``): over a seeded token sample (``targets.sample``: the
  first shards holding enough tokens, uniform positions; codes are decoded first), in float64.
  Each set records the digests of the arrays it was drawn from, so a reader can tell fresh
  statistics from stale ones (a shard rewritten, a teacher quantized since).
- **producers** (``extract``, ``quantize``, ``kdcache store stats``) write them into the store
  (``write_stats``, ``write_store_stats``); non-finite statistics are never written.
- **readers** (``reader_stats``): the store's when fresh, else the ones the caller kept from an
  earlier computation (a run directory) when still fresh, else computed in memory from the same
  sample, leaving out corrupt shards on request. The caller keeps what was computed.
- **live teachers** (``train --online``) accumulate ``moments`` of their features.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from kdcache.errors import CorruptShardError, StoreError
from kdcache.store.meta import TOKEN_KINDS, feature_path

from .sample import SampleSpec, draw, training_prefix

if TYPE_CHECKING:
    from kdcache.store import Store

log = logging.getLogger("kdcache.targets")

STATS_TOKENS = 131072  # tokens per statistics sample: a store's, and an online run's patch sample
STATS_SEED = 0  # the same sample for every producer and reader


def moments(rows: np.ndarray) -> dict:
    """{count, mean, covariance} of (N, D) rows, in float64."""
    x = np.asarray(rows, dtype=np.float64)
    return {"count": len(x), "mean": x.mean(0), "covariance": np.cov(x.T) if len(x) > 1 else np.eye(x.shape[1])}


def compute_stats(store: Store, teacher: str, kind: str, *, shards: list[str] | None = None, exclude=()) -> dict:
    """{count, mean, covariance, source} over the sample from ``shards`` (default: every complete
    one); CorruptShardError if a sampled shard fails its checks."""
    spec = SampleSpec(train_tokens=STATS_TOKENS, held_out=0, seed=STATS_SEED, pool=1)
    candidates = [s for s in (store.complete_shards([teacher]) if shards is None else sorted(shards)) if s not in set(exclude)]
    shards, enough = training_prefix(store, teacher, kind, spec, shards=candidates)
    x, _, desc = draw(store, teacher, kind, shards, spec)
    st = moments(x)
    if not (np.isfinite(st["mean"]).all() and np.isfinite(st["covariance"]).all()):
        raise StoreError(f"{store.url}: teacher {teacher} {kind}: statistics are not finite (shards {', '.join(shards)})")
    return {**st, "source": {"sampled_from": desc, "complete_sample": enough,
                             "digests": source_digests(store, shards, teacher, kind)}}


def source_digests(store: Store, shards: list[str], teacher: str, kind: str) -> dict:
    paths = (feature_path(teacher, kind), feature_path(teacher, kind, codes=True))
    # planned from the shard index where it has the shard (one request for every shard, not one each)
    return {s: {p: d for p, d in ((store.shard_summary(s) or {}).get("digest") or {}).items() if p in paths} for s in shards}


def is_fresh(store: Store, teacher: str, kind: str, source: dict | None) -> bool:
    """The statistics were drawn from exactly the arrays the store holds now."""
    digests = (source or {}).get("digests")
    if not isinstance(digests, dict) or not digests:
        return False
    try:
        return source_digests(store, list(digests), teacher, kind) == digests
    except Exception:  # noqa: BLE001 - a shard that vanished or broke: stale
        return False


def reader_stats(store: Store, teacher: str, kind: str, *, shards: list[str] | None = None, kept: dict | None = None,
                 skip_corrupt: bool = False) -> tuple[dict, bool]:
    """(statistics, computed here) for a reader: the store's when fresh, else ``kept`` (the
    caller's from an earlier computation, ``{count, mean, covariance, source}``) when fresh, else
    computed from the sample of ``shards`` (the ones the reader may read); with ``skip_corrupt``
    a sampled shard that fails verification is left out of the sample."""
    st = store.read_stats(teacher, kind)
    if st is not None and is_fresh(store, teacher, kind, st["attrs"]):
        return st, False
    if kept is not None and is_fresh(store, teacher, kind, kept.get("source")):
        return kept, False
    log.info("teacher %s %s: %s statistics in %s; computing them", teacher, kind, "stale" if st is not None else "no",
             store.url)
    excluded: list[str] = []
    while True:
        try:
            return compute_stats(store, teacher, kind, shards=shards, exclude=excluded), True
        except CorruptShardError as e:
            if not skip_corrupt or e.shard is None or e.shard in excluded:
                raise
            log.warning("statistics: leaving out corrupt shard %s", e.shard)
            excluded.append(e.shard)


def write_stats(store: Store, teacher: str, kind: str, st: dict) -> None:
    store.write_stats(teacher, kind, mean=st["mean"], covariance=st["covariance"], count=st["count"], attrs=st["source"])


def write_store_stats(store: Store, teachers=None) -> dict:
    """Producers: fresh statistics for every (teacher, tokens) of the store; returns counts."""
    out = {}
    for t in teachers or store.meta.teachers:
        for kind in TOKEN_KINDS:
            st = compute_stats(store, t, kind)
            write_stats(store, t, kind, st)
            out[f"{t}/{kind}"] = st["count"]
    return out


def write_stats_of(url: str, teachers=None) -> dict:
    """``kdcache store stats``: fresh statistics written into the store at ``url``, and its summary
    and shard index rewritten from every shard's metadata."""
    from kdcache.store import Store
    from kdcache.store.inspect import write_summary
    store = Store.open(url, writable=True)
    unknown = [t for t in teachers or () if t not in store.meta.teachers]
    if unknown:
        raise StoreError(f"{url}: no teacher {unknown[0]!r} (teachers: {', '.join(store.meta.teachers)})")
    summary = write_summary(store)
    return {"store": url, "tokens": write_store_stats(store, teachers), "shards_indexed": summary["shards_complete"]}
