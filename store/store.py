"""The storage boundary: open or create a store, list, read, write and delete its shards.

``Store`` is the only class that knows the directory layout of DESIGN.md; everything else in
kdcache goes through these verbs. A store is a Zarr v3 group on a local path or any fsspec
URL (``s3://``, ``gs://``, ``memory://``).
"""
from __future__ import annotations

import os

import numpy as np
import zarr
import zarr.storage
from zarr.errors import ContainsGroupError

from .errors import StoreError
from .meta import StoreMeta, TeacherMeta
from .shard_writer import ShardWriter

SHARDS = "shards"


def zarr_store(url: str, *, read_only: bool):
    """A zarr store object for a local path or an fsspec URL."""
    if "://" in url and not url.startswith("file://"):
        try:
            return zarr.storage.FsspecStore.from_url(url, read_only=read_only)
        except (ImportError, ValueError) as e:
            raise StoreError(f"{url}: cannot open this URL as a store: {e}") from None
    path = url[len("file://"):] if url.startswith("file://") else url
    if read_only and not os.path.isdir(path):
        raise StoreError(f"{path}: no store here (not a directory)")
    if not read_only:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the store directory: {e.strerror}") from None
        if not os.access(path, os.W_OK):
            raise StoreError(f"{path}: the store directory is not writable")
    return zarr.storage.LocalStore(path, read_only=read_only)


def _is_missing(e: Exception) -> bool:
    return isinstance(e, (FileNotFoundError, KeyError)) or type(e).__name__ in ("GroupNotFoundError", "NodeNotFoundError")


class Store:
    """A kdcache store. Use :meth:`open` or :meth:`create`, never the constructor.

    Shard state: a shard group exists once a writer starts it, and is *complete* once its
    ``complete`` attribute is true (written last). A teacher is present in a complete shard
    when the shard's ``digest`` lists its arrays (also written last when adding teachers).
    """

    def __init__(self, url: str, root, meta: StoreMeta, *, writable: bool):
        self.url = url
        self.root = root
        self.meta = meta
        self.writable = writable

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, writable: bool = False) -> "Store":
        """Open an existing store; a clear StoreError if there is none or it is not kdcache's."""
        zs = zarr_store(url, read_only=not writable)
        try:
            root = zarr.open_group(zs, mode="r+" if writable else "r")
        except Exception as e:  # zarr raises several types for "nothing here"
            if _is_missing(e) or isinstance(e, (FileNotFoundError, ValueError)):
                raise StoreError(f"{url}: no kdcache store here") from None
            raise
        d = root.attrs.get("kdcache")
        if not isinstance(d, dict):
            raise StoreError(f"{url}: a zarr group, but not a kdcache store (no 'kdcache' attribute)")
        return cls(url, root, StoreMeta.from_dict(d, where=url), writable=writable)

    @classmethod
    def exists(cls, url: str) -> bool:
        try:
            cls.open(url)
            return True
        except StoreError:
            return False

    @classmethod
    def create(cls, url: str, meta: StoreMeta) -> "Store":
        """Create a store (or re-create its root metadata if the group exists but has none).

        Several ranks may do this at once with the same metadata: every step tolerates a
        concurrent creator (metadata files are replaced atomically).
        """
        zs = zarr_store(url, read_only=False)
        try:
            try:
                root = zarr.open_group(zs, mode="a")
            except ContainsGroupError:
                root = zarr.open_group(zs, mode="r+")
            root.attrs.put({"kdcache": meta.to_dict()})
            ensure_group(root, SHARDS)
        except PermissionError as e:
            raise StoreError(f"{url}: not writable: {e}") from None
        return cls(url, root, meta, writable=True)

    def write_meta(self, meta: StoreMeta) -> None:
        self._need_writable()
        self.root.attrs.put({**self.root.attrs.asdict(), "kdcache": meta.to_dict()})
        self.meta = meta

    def _need_writable(self):
        if not self.writable:
            raise StoreError(f"{self.url}: opened read-only")

    # -- shards -------------------------------------------------------------------------
    def _shards_group(self):
        try:
            return self.root[SHARDS]
        except KeyError:
            return None

    def shard_names(self) -> list[str]:
        """Every shard group that exists, complete or not, sorted."""
        g = self._shards_group()
        return sorted(g.group_keys()) if g is not None else []

    def shard_attrs(self, name: str) -> dict | None:
        """The shard's attributes, or None when the shard does not exist or is unreadable."""
        try:
            return dict(self.root[f"{SHARDS}/{name}"].attrs)
        except Exception as e:
            if _is_missing(e) or isinstance(e, ValueError):
                return None
            raise

    def is_complete(self, name: str, teachers=None) -> bool:
        """Complete, and (if given) holding every one of ``teachers``."""
        a = self.shard_attrs(name)
        if not a or a.get("complete") is not True:
            return False
        digest = a.get("digest", {})
        return all(has_teacher(digest, t) for t in (teachers or ()))

    def complete_shards(self, teachers=None) -> list[str]:
        return [n for n in self.shard_names() if self.is_complete(n, teachers)]

    def delete_shard(self, name: str) -> None:
        self._need_writable()
        g = self._shards_group()
        if g is not None and name in g:
            del g[name]

    def new_shard(self, name: str, teachers: dict[str, TeacherMeta]) -> ShardWriter:
        """Start writing shard ``name`` from scratch (an earlier partial write is removed)."""
        self._need_writable()
        self.delete_shard(name)
        group = ensure_group(self.root, SHARDS).create_group(name, attributes={"complete": False})
        return ShardWriter(group, teachers=teachers, views=self.meta.views)

    def extend_shard(self, name: str, teachers: dict[str, TeacherMeta]) -> ShardWriter:
        """Add teacher arrays to complete shard ``name`` (partial earlier attempts removed)."""
        self._need_writable()
        attrs = self.shard_attrs(name)
        if not attrs or not attrs.get("complete"):
            raise StoreError(f"{self.url}: shard {name} is not complete; cannot add teachers to it")
        group = self.root[f"{SHARDS}/{name}"]
        for t in teachers:
            if t in group:
                del group[t]
        return ShardWriter(group, teachers=teachers, views=self.meta.views, write_index=False,
                           expected_count=attrs["count"])

    # -- reading ------------------------------------------------------------------------
    def array(self, shard: str, path: str):
        """The zarr array ``shards/<shard>/<path>`` (lazy; slicing reads)."""
        try:
            return self.root[f"{SHARDS}/{shard}/{path}"]
        except KeyError:
            raise StoreError(f"{self.url}: shard {shard} has no array {path!r}") from None

    def keys(self, shard: str) -> np.ndarray:
        return np.asarray(self.array(shard, "keys")[:].tolist(), dtype=str)  # StringDType -> plain str

    def views(self, shard: str) -> np.ndarray:
        return np.asarray(self.array(shard, "views")[:])

    def teacher_arrays(self, shard: str, teacher: str):
        """(cls, patch) zarr arrays of one teacher in one shard."""
        if teacher not in self.meta.teachers:
            raise StoreError(f"{self.url}: no teacher {teacher!r} (teachers: {', '.join(self.meta.teachers)})")
        return self.array(shard, f"{teacher}/cls"), self.array(shard, f"{teacher}/patch")

    def read_features(self, shard: str, teacher: str, *, as_float: bool = True):
        """(cls, patch) numpy arrays of a whole shard; bfloat16 bits widened when ``as_float``."""
        cls_arr, patch_arr = self.teacher_arrays(shard, teacher)
        dtype = self.meta.teachers[teacher].dtype
        c, p = cls_arr[:], patch_arr[:]
        if as_float and dtype == "bfloat16":
            c, p = bf16_bits_to_float32(c), bf16_bits_to_float32(p)
        return c, p


def ensure_group(root, path: str):
    """``require_group`` that tolerates another process creating the group at the same time."""
    try:
        return root.require_group(path)
    except ContainsGroupError:
        return root[path]


def has_teacher(digest: dict, teacher: str) -> bool:
    """A shard holds a teacher once its patch array (float or codes) is in the digest."""
    return f"{teacher}/patch" in digest or f"{teacher}/patch_codes" in digest


def as_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored feature rows of logical ``dtype`` (float16, float32, or bfloat16 bits) -> float32."""
    return bf16_bits_to_float32(rows) if dtype == "bfloat16" else np.asarray(rows, dtype=np.float32)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of fp32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
