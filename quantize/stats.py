"""Normalisation statistics of a teacher's targets (count, mean, covariance), with their source.

Taken over a seeded token sample (the quantizer's sampler: the first shards holding enough
tokens, uniform positions; codes are decoded first), in float64. Each set records the digests
of the arrays it was drawn from, so a reader can tell fresh statistics from stale ones (a
shard rewritten, a teacher quantized since). Producers (``extract``, ``quantize``,
``kdcache store stats``) write them into the store; non-finite statistics are never written.
"""
from __future__ import annotations

import numpy as np

from kdcache.store import CorruptShardError, Store, StoreError, feature_path

from .sample import SampleSpec, draw, training_prefix

STATS_TOKENS = 131072
STATS_SEED = 0  # the same sample for every producer and reader


def compute_stats(store: Store, teacher: str, kind: str, *, shards: list[str] | None = None, exclude=()) -> dict:
    """{count, mean, covariance, source} over the sample from ``shards`` (default: every complete
    one); CorruptShardError if a sampled shard fails its checks."""
    spec = SampleSpec(train_tokens=STATS_TOKENS, held_out=0, seed=STATS_SEED, pool=1)
    candidates = [s for s in (store.complete_shards([teacher]) if shards is None else sorted(shards)) if s not in set(exclude)]
    shards, enough = training_prefix(store, teacher, kind, spec, shards=candidates)
    x, _, desc = draw(store, teacher, kind, shards, spec)
    x = x.astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x.T) if len(x) > 1 else np.eye(x.shape[1])
    if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        raise CorruptShardError(f"{store.url}: teacher {teacher} {kind}: statistics are not finite (shards {', '.join(shards)})")
    return {"count": len(x), "mean": mean, "covariance": cov,
            "source": {"sampled_from": desc, "complete_sample": enough, "digests": source_digests(store, shards, teacher, kind)}}


def source_digests(store: Store, shards: list[str], teacher: str, kind: str) -> dict:
    paths = (feature_path(teacher, kind), feature_path(teacher, kind, codes=True))
    return {s: {p: d for p, d in ((store.shard_attrs(s) or {}).get("digest") or {}).items() if p in paths} for s in shards}


def is_fresh(store: Store, teacher: str, kind: str, source: dict | None) -> bool:
    """The statistics were drawn from exactly the arrays the store holds now."""
    digests = (source or {}).get("digests")
    if not isinstance(digests, dict) or not digests:
        return False
    try:
        return source_digests(store, list(digests), teacher, kind) == digests
    except Exception:  # noqa: BLE001 - a shard that vanished or broke: stale
        return False


def write_stats(store: Store, teacher: str, kind: str, st: dict) -> None:
    store.write_stats(teacher, kind, mean=st["mean"], covariance=st["covariance"], count=st["count"], attrs=st["source"])


def write_all_stats(store: Store, teachers=None) -> dict:
    """Producers: fresh statistics for every (teacher, tokens) of the store; returns counts."""
    out = {}
    for t in teachers or store.meta.teachers:
        for kind in ("cls", "patch"):
            st = compute_stats(store, t, kind)
            write_stats(store, t, kind, st)
            out[f"{t}/{kind}"] = st["count"]
    return out


def write_stats_of(url: str, teachers=None) -> dict:
    """``kdcache store stats``: fresh statistics written into the store at ``url``."""
    store = Store.open(url, writable=True)
    unknown = [t for t in teachers or () if t not in store.meta.teachers]
    if unknown:
        raise StoreError(f"{url}: no teacher {unknown[0]!r} (teachers: {', '.join(store.meta.teachers)})")
    return {"store": url, "tokens": write_all_stats(store, teachers)}
