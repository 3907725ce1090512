"""kdcache's store: the sharded Zarr format behind a few verbs.

Depends on nothing else in kdcache, and is the only code that knows the store's paths.
``Store.open`` / ``Store.create`` give a store; shards are written with ``Store.new_shard`` /
``Store.extend_shard`` (a ``ShardWriter``) and read with ``Store.keys``, ``Store.views``,
``Store.array``; quantizers and statistics with ``Store.read_codebooks`` / ``read_stats``.
``verify`` checks a store (and, given the corpus keys, that it matches its corpus); ``inspect``
reports on it; ``dtypes`` is the one place bfloat16 is handled.
"""
from .codes import Codebooks
from .dtypes import STORAGE_DTYPES, to_float32
from .errors import CorruptShardError, KdcacheError, StoreError
from .meta import CODECS, FORMAT_VERSION, StoreMeta, TeacherMeta, ViewPolicy, feature_path, has_teacher
from .shard_writer import ShardWriter
from .store import Store
from .verify import VerifyReport, verify

__all__ = [
    "CODECS", "Codebooks", "CorruptShardError", "FORMAT_VERSION", "KdcacheError", "STORAGE_DTYPES", "ShardWriter", "Store", "StoreError",
    "StoreMeta", "TeacherMeta", "VerifyReport", "ViewPolicy", "feature_path", "has_teacher", "to_float32", "verify",
]
