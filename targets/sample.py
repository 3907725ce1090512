"""The seeded token sample of a teacher's own features, and its held-out tokens.

Read by quantizer training (``quantize``) and by normalisation statistics (``targets.stats``).

Which shards: the shortest prefix of the store's complete shards (sorted by name, which is
corpus order) holding at least ``POOL`` times the tokens wanted, so extraction can train as
soon as that prefix is written, and ``kdcache quantize`` on a finished store picks the very
same shards. Which tokens: drawn uniformly without replacement over every (image, view,
token) position of those shards with ``seed``; the first ``held_out`` draws are kept out of
training to measure fidelity. Reads one shard at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.store.meta import feature_path

if TYPE_CHECKING:  # annotations only: importing this module (for SampleSpec) stays light
    from kdcache.store import Store

POOL = 4  # draw from >= 4x the tokens used, so the sample spreads over many images


@dataclass(frozen=True)
class SampleSpec:
    """How many tokens to train on (plus ``held_out``, default 1/8 of that, at most 8192),
    drawn with ``seed`` from shards holding at least ``pool`` times as many."""

    train_tokens: int = 65536
    held_out: int | None = None
    seed: int = 0
    pool: int = POOL

    def __post_init__(self):
        for name, low in (("train_tokens", 1), ("pool", 1), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise KdcacheError(f"--{name.replace('_', '-')} {v!r}: need an integer >= {low}")
        if self.held_out is not None and (not isinstance(self.held_out, int) or self.held_out < 0):
            raise KdcacheError(f"held-out tokens {self.held_out!r}: need an integer >= 0")

    @property
    def held(self) -> int:
        return self.held_out if self.held_out is not None else min(8192, self.train_tokens // 8)

    @property
    def total(self) -> int:
        return self.train_tokens + self.held


def tokens_per_row(store: Store, teacher: str, kind: str) -> int:
    t = store.meta.teachers[teacher]
    return store.meta.views * (t.tokens if kind == "patch" else 1)


def training_prefix(store: Store, teacher: str, kind: str, spec: SampleSpec, shards: list[str] | None = None) -> tuple[list[str], bool]:
    """(shards, enough): the prefix of ``shards`` (default: complete ones, sorted) to sample from."""
    shards = sorted(store.complete_shards([teacher]) if shards is None else shards)
    per_row, chosen, total = tokens_per_row(store, teacher, kind), [], 0
    for name in shards:
        chosen.append(name)
        total += int(store.shard_summary(name)["count"]) * per_row
        if total >= spec.pool * spec.total:
            return chosen, True
    return chosen, False


def draw(store: Store, teacher: str, kind: str, shards: list[str], spec: SampleSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train (N, D) float32, held_out (H, D) float32, description for the store's attrs)."""
    per_row = tokens_per_row(store, teacher, kind)
    counts = [int(store.shard_summary(s)["count"]) * per_row for s in shards]
    total = sum(counts)
    rng = np.random.default_rng(spec.seed)
    want = min(spec.total, total)
    picks = rng.choice(total, size=want, replace=False)
    order = np.argsort(picks, kind="stable")
    out = np.empty((want, store.meta.teachers[teacher].dim), dtype=np.float32)
    starts = np.cumsum([0] + counts)
    sorted_picks = picks[order]
    for i, name in enumerate(shards):
        lo, hi = np.searchsorted(sorted_picks, [starts[i], starts[i + 1]])
        if lo == hi:
            continue
        flat = _float_tokens(store, name, teacher, kind)
        out[order[lo:hi]] = flat[sorted_picks[lo:hi] - starts[i]]
    held = min(spec.held, want // 5)
    desc = {"shards": shards, "pool_tokens": int(total), "train_tokens": int(want - held), "held_out_tokens": int(held),
            "seed": spec.seed, "rule": f"first shards holding >= {spec.pool}x the sample; uniform without replacement"}
    return out[held:], out[:held], desc


def _float_tokens(store: Store, shard: str, teacher: str, kind: str) -> np.ndarray:
    """A shard's features as (N, D) float32: the float array, or the codes decoded."""
    digest = (store.shard_attrs(shard) or {}).get("digest", {})
    codes_path = feature_path(teacher, kind, codes=True)
    if feature_path(teacher, kind) not in digest and codes_path in digest:
        blocks = list(store.read_blocks(shard, codes_path))  # verified, as every read
        if not blocks:
            return np.zeros((0, store.meta.teachers[teacher].dim), dtype=np.float32)
        codes = np.concatenate(blocks)
        return store.read_codebooks(teacher, kind).decode(codes.reshape(-1, codes.shape[-1]))
    arr = store.read_features(shard, teacher, kind)
    return arr.reshape(-1, arr.shape[-1])
