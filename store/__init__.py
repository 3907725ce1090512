"""kdcache's store: the sharded Zarr format behind a few verbs.

Depends on nothing else in kdcache but ``kdcache.errors``, and is the only code that knows the
store's paths. ``Store.open`` / ``Store.create`` give a store; shards are written with
``Store.new_shard`` / ``Store.extend_shard`` (a ``ShardWriter``) and read with ``Store.keys``,
``Store.views``, ``Store.read_block``; quantizers and statistics with ``Store.read_codebooks`` /
``read_stats``. ``verify`` checks a store (and, given the corpus keys, that it matches its
corpus); ``inspect`` reports on it; ``dtypes`` is the one place bfloat16 bits are widened.

The names below are loaded on first use (PEP 562), so ``import kdcache.store.meta`` (the
metadata, the command line's vocabularies) does not load Zarr.
"""
from __future__ import annotations

import importlib

from kdcache.errors import CorruptShardError, KdcacheError, StoreError

_LAZY = {
    "Codebooks": "codes", "STORAGE_DTYPES": "dtypes", "to_float32": "dtypes",
    "CODECS": "meta", "FORMAT_VERSION": "meta", "INTERPOLATIONS": "meta", "TOKEN_KINDS": "meta", "StoreMeta": "meta",
    "TeacherMeta": "meta", "ViewPolicy": "meta", "feature_path": "meta", "has_teacher": "meta",
    "ShardWriter": "shard_writer", "Store": "store", "VerifyReport": "verify",
}

__all__ = ["CorruptShardError", "KdcacheError", "StoreError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
