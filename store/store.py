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

from kdcache.errors import StoreError, first_line

from .codes import Codebooks, read_codebooks, write_codebooks
from .edits import ShardEdits
from .lease import LEASE_SECONDS, Leases, leases_for
from .meta import (LOGIT_ARRAYS, SHARDS, TOKEN_KINDS, StoreMeta, TeacherMeta, feature_path, has_teacher, logits_path,
                   quantizer_path, stats_path, teacher_arrays)
from .reads import VerifiedReads
from .remote import is_url, local_path
from .schema import check_name, check_shard_attrs
from .shard_writer import ShardWriter


def zarr_store(url: str, *, read_only: bool):
    """A zarr store object for a local path or an fsspec URL."""
    if is_url(url):
        try:
            return zarr.storage.FsspecStore.from_url(url, read_only=read_only)
        except (ImportError, ValueError) as e:
            raise StoreError(f"{url}: cannot open this URL as a store: {e}") from None
    path = local_path(url)
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


async def _list_dir(store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


def _sync(coro):
    from zarr.core.sync import sync
    return sync(coro)


def _is_missing(e: Exception) -> bool:
    return isinstance(e, (FileNotFoundError, KeyError)) or type(e).__name__ in ("GroupNotFoundError", "NodeNotFoundError")


class Store(VerifiedReads, ShardEdits):
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
        except Exception as e:  # noqa: BLE001 - zarr raises several types for "nothing (readable) here"
            if _is_missing(e) or isinstance(e, (FileNotFoundError, ValueError)):
                raise StoreError(f"{url}: no kdcache store here") from None
            raise StoreError(f"{url}: cannot open the store's root ({type(e).__name__}: {first_line(e)})") from None
        d = root.attrs.get("kdcache")
        if not isinstance(d, dict):
            raise StoreError(f"{url}: a zarr group, but not a kdcache store (no 'kdcache' attribute)")
        store = cls(url, root, StoreMeta.from_dict(d, where=url), writable=writable)
        store.shard_names()  # a hostile shard name is refused here, by every reader and writer alike (one listing)
        return store

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
        """Every shard group that exists, complete or not, sorted; a name that could point
        outside the store (``..x``, a separator, control characters) is refused."""
        # listed from the storage, not by parsing every child's zarr.json: a broken one is then
        # reported for its own shard when read (shard_attrs), never while listing the others
        names = sorted(n for n in _sync(_list_dir(self.root.store, SHARDS)) if n != "zarr.json")
        for n in names:
            check_name(n, f"{self.url}: shards", "shard")
        return names

    def shard_attrs(self, name: str) -> dict | None:
        """The shard's attributes, validated (``schema.check_shard_attrs``); None when the shard
        does not exist. Unreadable or invalid metadata is a StoreError naming shard and field."""
        check_name(name, f"{self.url}: shards", "shard")
        try:
            group = self.root[f"{SHARDS}/{name}"]
            attrs = dict(group.attrs)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing or broken zarr.json
            if _is_missing(e):
                return None
            raise StoreError(f"{self.url}: shard {name}: metadata unreadable ({type(e).__name__}: {first_line(e)})") from None
        return check_shard_attrs(attrs, f"{self.url}: shard {name}", array_paths=self.possible_arrays())

    def possible_arrays(self) -> set[str]:
        """Every array path a shard of this store may hold."""
        out = {"keys", "views"}
        for t in self.meta.teachers:
            out |= {feature_path(t, kind, codes=codes) for kind in TOKEN_KINDS for codes in (False, True)}
            out |= {logits_path(t, part) for part in LOGIT_ARRAYS}
        return out

    def expected_arrays(self) -> dict[str, tuple[tuple, str]]:
        """Array path -> (row shape, zarr dtype), as the teacher metadata declares them."""
        k = self.meta.views
        out = {"views": ((k, 5), "float32")}
        for t, m in self.meta.teachers.items():
            out.update({p: (shape, dtype) for p, (shape, dtype, _) in teacher_arrays(t, m, k).items()})
        return out

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

    # -- quantizers and statistics -------------------------------------------------------
    def read_codebooks(self, teacher: str, kind: str) -> Codebooks | None:
        """The stored quantizer of a teacher's ``kind`` tokens, or None (none, or unfinished)."""
        try:
            return read_codebooks(self.root[quantizer_path(teacher, kind)])
        except KeyError:
            return None

    def write_codebooks(self, teacher: str, kind: str, cb: Codebooks) -> None:
        self._need_writable()
        write_codebooks(self._fresh_group(quantizer_path(teacher, kind)), cb)

    def read_stats(self, teacher: str, kind: str) -> dict | None:
        """{count, mean, covariance, attrs} of a teacher's targets, or None when not written."""
        try:
            g = self.root[stats_path(teacher, kind)]
        except KeyError:
            return None
        attrs = dict(g.attrs)
        if not attrs.get("ready"):
            return None
        return {"count": int(attrs["count"]), "mean": g["mean"][:], "covariance": g["covariance"][:], "attrs": attrs}

    def write_stats(self, teacher: str, kind: str, *, mean: np.ndarray, covariance: np.ndarray, count: int,
                    attrs: dict) -> None:
        self._need_writable()
        g = self._fresh_group(stats_path(teacher, kind))
        for name, a in (("mean", mean), ("covariance", covariance)):
            g.create_array(name, shape=a.shape, dtype="float64", chunks=a.shape)[...] = a
        g.attrs.put({**attrs, "count": int(count), "ready": True})

    # -- writers' leases --------------------------------------------------------------------
    def leases(self, owner: str, *, seconds: float = LEASE_SECONDS, pid: int | None = None) -> Leases:
        """This store's shard leases (``lease.py``), held as ``owner`` by process ``pid``."""
        return leases_for(self.url, owner, seconds=seconds, pid=pid)

    def _fresh_group(self, path: str):
        if path in self.root:
            del self.root[path]
        return ensure_group(self.root, path)


def ensure_group(root, path: str):
    """``require_group`` that tolerates another process creating the group at the same time."""
    try:
        return root.require_group(path)
    except ContainsGroupError:
        return root[path]
