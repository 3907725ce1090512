"""kdcache's store: the sharded Zarr format of DESIGN.md behind a few verbs.

Depends on nothing else in kdcache. ``Store.open`` / ``Store.create`` give a store; shards are
written with ``Store.new_shard`` / ``Store.extend_shard`` (a ``ShardWriter``) and read with
``Store.keys``, ``Store.views``, ``Store.read_features``; ``inspect`` reports and verifies.
"""
from .errors import KdcacheError, StoreError
from .meta import CODECS, FORMAT_VERSION, STORAGE_DTYPES, StoreMeta, TeacherMeta, ViewPolicy
from .shard_writer import ShardWriter
from .store import Store, as_float32, bf16_bits_to_float32

__all__ = [
    "CODECS", "FORMAT_VERSION", "STORAGE_DTYPES", "KdcacheError", "ShardWriter", "Store", "StoreError",
    "StoreMeta", "TeacherMeta", "ViewPolicy", "as_float32", "bf16_bits_to_float32",
]
