"""The storage boundary: open or create a store, list, read, write and delete its shards.

``Store`` is the only class that knows the directory layout of DESIGN.md; everything else in
kdcache goes through these verbs. A store is a Zarr v3 group on a local path or any fsspec
URL (``s3://``, ``gs://``, ``memory://``).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import zarr
import zarr.storage
from zarr.errors import ContainsGroupError

from kdcache.errors import CorruptShardError, KdcacheError, StoreError, check_output, first_line

from .codes import Codebooks, read_codebooks, write_codebooks
from .dtypes import itemsize
from .layout import block_rows, shard_binding
from .edits import ShardEdits
from .lease import LEASE_SECONDS, Leases, leases_for
from .objects import Objects
from .meta import (INDEX_ARRAYS, LOGIT_ARRAYS, ORIGIN, ORIGIN_COLUMNS, PIXEL_ARRAYS, SHARDS, TOKEN_KINDS, StoreMeta, TeacherMeta, dense_path, feature_path, has_teacher, logits_path,
                   quantizer_path, stats_path, teacher_arrays)
from .reads import OpenedArrays, VerifiedReads
from .remote import is_url, local_path
from .schema import check_name, check_shard_attrs
from .shard_index import (INDEX_ATTR, INDEX_KEY, MAX_INDEX_BYTES, agrees, entry_is_bound, entry_of, index_digest,
                          parse_index, render_index)
from .shard_writer import ShardWriter

log = logging.getLogger("kdcache.store")
V3 = dict(zarr_format=3, use_consolidated=False)  # kdcache stores are Zarr v3: no probing for v2 or consolidated keys


def zarr_store(url: str, *, read_only: bool):
    """A zarr store object for a local path or an fsspec URL."""
    if is_url(url):
        try:
            return zarr.storage.FsspecStore.from_url(url, read_only=read_only, storage_options=_one_request_reads(url))
        except (ImportError, ValueError) as e:
            raise StoreError(f"{url}: cannot open this URL as a store: {e}") from None
    path = local_path(url)
    if read_only and not os.path.isdir(path):
        raise StoreError(f"{path}: no store here (not a directory)")
    if not read_only:
        try:
            check_output(path, kind="dir", option="store")  # a file there, or nowhere to write: one line, before any write
        except KdcacheError as e:
            raise StoreError(str(e)) from None
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the store directory: {e.strerror}") from None
    return zarr.storage.LocalStore(path, read_only=read_only)


def _one_request_reads(url: str) -> dict | None:
    """s3fs asks for an object's size (a HEAD) before every whole-object read, to decide on a
    concurrent download that pays off only beyond its 50 MB block size; a store's whole-object reads
    are its small metadata (blocks are read by range), so every one would cost two requests.
    ``max_concurrency=1`` skips the HEAD, unless the user configured it (fsspec config, environment)."""
    import fsspec.config
    if url.split("://", 1)[0] not in ("s3", "s3a") or "max_concurrency" in fsspec.config.conf.get("s3", {}):
        return None
    return {"max_concurrency": 1}


def _is_missing(e: Exception) -> bool:
    return isinstance(e, (FileNotFoundError, KeyError)) or type(e).__name__ in ("GroupNotFoundError", "NodeNotFoundError")


class Store(VerifiedReads, ShardEdits):
    """A kdcache store. Use :meth:`open` or :meth:`create`, never the constructor.

    Shard state: a shard group exists once a writer starts it, and is *complete* once its
    ``complete`` attribute is true (written last). A teacher is present in a complete shard
    when the shard's ``digest`` lists its arrays (also written last when adding teachers).
    """

    def __init__(self, url: str, root, meta: StoreMeta, *, writable: bool, use_index: bool = False):
        self.url = url
        self.root = root
        self.meta = meta
        self.writable = writable
        self.objects = Objects(url)  # the few reads below an array's level: the index, the listing, whole blocks
        # A reader plans with the shard index and keeps what it has read: the listing, each shard's
        # attributes (shard_index.py). A writer always asks the shards themselves.
        self.use_index = use_index and not writable
        self._index: dict[str, dict] | None = None
        self._names: list[str] | None = None
        self._attrs: dict[str, dict | None] = {}
        self._opened = OpenedArrays()  # a reader's arrays of the shards it reads last (reads.VerifiedReads.array)

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, writable: bool = False, index: bool = True) -> "Store":
        """Open an existing store; a clear StoreError if there is none or it is not kdcache's.
        A read-only store plans with the shard index unless ``index`` is off (``verify``)."""
        zs = zarr_store(url, read_only=not writable)
        try:
            root = zarr.open_group(zs, mode="r+" if writable else "r", **V3)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for "nothing (readable) here"
            if _is_missing(e) or isinstance(e, (FileNotFoundError, ValueError)):
                raise StoreError(f"{url}: no kdcache store here") from None
            raise StoreError(f"{url}: cannot open the store's root ({type(e).__name__}: {first_line(e)})") from None
        d = root.attrs.get("kdcache")
        if not isinstance(d, dict):
            raise StoreError(f"{url}: a zarr group, but not a kdcache store (no 'kdcache' attribute)")
        store = cls(url, root, StoreMeta.from_dict(d, where=url), writable=writable, use_index=index)
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
                root = zarr.open_group(zs, mode="a", **V3)
            except ContainsGroupError:
                root = zarr.open_group(zs, mode="r+", **V3)
            root.attrs.put({"kdcache": meta.to_dict()})
            ensure_group(root, SHARDS)
        except PermissionError as e:
            raise StoreError(f"{url}: not writable: {e}") from None
        except Exception as e:  # noqa: BLE001 - object storage out of reach (endpoint, credentials, bucket): one line
            if isinstance(e, KdcacheError):
                raise
            raise StoreError(f"{url}: cannot create the store ({type(e).__name__}: {first_line(e)})") from None
        return cls(url, root, meta, writable=True)

    def write_meta(self, meta: StoreMeta) -> None:
        self._need_writable()
        root = zarr.open_group(self.root.store, mode="r+", **V3)  # re-read: keep what other jobs wrote (the index digest)
        root.attrs.put({**root.attrs.asdict(), "kdcache": meta.to_dict()})
        self.root, self.meta = root, meta

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
        if self._names is not None:
            return list(self._names)
        names = [n for n in self.objects.names(SHARDS) if n != "zarr.json"]
        for n in names:
            check_name(n, f"{self.url}: shards", "shard")
        if self.use_index:
            self._names = names
        return list(names)

    def shard_attrs(self, name: str) -> dict | None:
        """The shard's own attributes, validated (``schema.check_shard_attrs``); None when the
        shard does not exist. Unreadable or invalid metadata is a StoreError naming shard and
        field. A reader checks them against the shard index's entry: a disagreement is warned
        about once and the index entry dropped (the shard's metadata wins)."""
        check_name(name, f"{self.url}: shards", "shard")
        if self.use_index and name in self._attrs:
            return self._attrs[name]
        try:
            group = self.root[f"{SHARDS}/{name}"]
            attrs = dict(group.attrs)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing or broken zarr.json
            if _is_missing(e):
                attrs = None
            else:
                raise StoreError(f"{self.url}: shard {name}: metadata unreadable ({type(e).__name__}: "
                                 f"{first_line(e)})") from None
        if attrs is not None:
            attrs = check_shard_attrs(attrs, f"{self.url}: shard {name}", array_paths=self.possible_arrays())
            self._check_binding(name, attrs)
        if self.use_index:
            self._attrs[name] = attrs
            entry = (self._index or {}).get(name)
            if entry is not None and not agrees(entry, attrs):
                log.warning("%s: the shard index's entry for shard %s disagrees with the shard's own metadata "
                            "(stale or tampered); the shard's metadata wins (kdcache store stats rewrites the index)",
                            self.url, name)
                del self._index[name]
        return attrs

    def _check_binding(self, name: str, attrs: dict) -> None:
        """A complete shard's record must hash to the binding written with it (``layout.shard_binding``);
        in a store of format 4 every complete shard has one."""
        if attrs.get("complete") is not True:
            return
        where = f"{self.url}: shard {name}"
        if "binding" not in attrs:
            if self.meta.binds_shards:
                raise CorruptShardError(f"{where}: no binding, though store format {self.meta.format} binds every "
                                        f"complete shard to its name (its metadata was edited)", shard=name)
            return
        if shard_binding(name, attrs) != attrs["binding"]:
            raise CorruptShardError(f"{where}: its record does not hash to its binding: digests, checksums or count "
                                    f"edited, or the shard swapped, duplicated or renamed (it was written as another)",
                                    shard=name)

    # -- the shard index (shard_index.py) -----------------------------------------------------
    def stored_index(self, *, warn: bool = True) -> dict[str, dict] | None:
        """The stored shard index's entries, validated and checked against the digest the root
        metadata records for it; None when there is none, or (with a warning) when it is
        unreadable, invalid or not the index the root names (tampered, or a write in progress)."""
        where = f"{self.url}: {INDEX_KEY}"
        try:
            try:
                got = self.objects.get(INDEX_KEY, limit=MAX_INDEX_BYTES)
            except ValueError:
                raise StoreError(f"{where}: larger than {MAX_INDEX_BYTES} bytes") from None
            if got is None:
                return None
            raw = got.tobytes()
            named = self._root_attrs().get(INDEX_ATTR)
            if not isinstance(named, dict) or named.get("sha256") != index_digest(raw):
                raise StoreError(f"{where}: not the index the root metadata names (its sha256 differs: changed "
                                 f"outside kdcache, or written while this store was opened)")
            entries = parse_index(raw, where=where, array_paths=self.possible_arrays())
            unbound = [n for n, e in entries.items() if not entry_is_bound(n, e)]
            if unbound and warn:
                log.warning("%s: %d entr%s (first: shard %s) do not hash to the binding they record (edited on their "
                            "own); ignored: those shards' own metadata is read instead", where, len(unbound),
                            "y" if len(unbound) == 1 else "ies", unbound[0])
            return {n: e for n, e in entries.items() if n not in unbound}
        except (StoreError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                return None
            if warn:
                log.warning("%s; ignored: every shard's own metadata is read instead", first_line(e))
            return None

    def write_index(self, entries: dict[str, dict]) -> None:
        """The index object first, then its digest in the root metadata (a reader between the two
        finds them different and reads the shards themselves)."""
        self._need_writable()
        raw = render_index(entries)
        self.objects.put(INDEX_KEY, raw)
        root = zarr.open_group(self.root.store, mode="r+", **V3)  # re-read: other jobs may have changed the root since
        root.attrs.put({**root.attrs.asdict(), INDEX_ATTR: {"sha256": index_digest(raw), "shards": len(entries)}})
        self.root = root

    def _root_attrs(self) -> dict:
        """The root attributes: as opened for a reader, re-read for a writer (others write them too)."""
        if self.use_index:
            return self.root.attrs.asdict()
        return zarr.open_group(self.root.store, mode="r", **V3).attrs.asdict()

    def _index_entries(self) -> dict[str, dict]:
        if self._index is None:
            self._index = self.stored_index() or {}
        return self._index

    def shard_summary(self, name: str, *, indexed: bool = True) -> dict | None:
        """What a reader plans with: ``{complete, count, failures, digest, nbytes, indexed}`` of a
        shard, from the shard index when it has the shard (and ``indexed``), else from the shard's
        own metadata (``nbytes`` then None: ``shard_nbytes`` measures it); ``{complete: False}``
        for an incomplete shard; None for none."""
        if self.use_index and indexed:
            entry = self._index_entries().get(name)
            if entry is not None:
                return {"complete": True, **entry, "indexed": True}
        a = self.shard_attrs(name)
        if a is None:
            return None
        if a.get("complete") is not True:
            return {"complete": False}
        return {"complete": True, **entry_of(a, {}), "nbytes": None, "indexed": False}

    def shard_block(self, name: str) -> int:
        """Rows per block of a complete shard, as a reader plans its reads: the shard's own record
        (format 3, or its shard index entry), else what the writers of its format chose from the
        teachers' bytes per sample (a plan only: reads follow each array's own blocks)."""
        s = self.shard_summary(name) or {}
        if isinstance(s.get("block"), int):
            return s["block"]
        m = self.meta
        return block_rows(max([1] + [t.tokens * t.dim * m.views * itemsize(t.dtype) for t in m.teachers.values()]))

    def shard_nbytes(self, name: str) -> dict[str, int]:
        """Bytes stored per array of a shard: from the shard index when it has them, else measured."""
        s = self.shard_summary(name) if self.use_index else None
        if s and s.get("nbytes") is not None:
            return s["nbytes"]
        return self.array_nbytes(name)

    def index_entries_of(self, names) -> dict[str, dict]:
        """Fresh index entries of these shards, from their own metadata (complete ones only)."""
        out = {}
        for n in names:
            a = self.shard_attrs(n)
            if a and a.get("complete") is True:
                out[n] = entry_of(a, self.array_nbytes(n))
        return out

    def possible_arrays(self) -> set[str]:
        """Every array path a shard of this store may hold."""
        out = set(INDEX_ARRAYS)
        if self.meta.pixels is not None:
            out |= set(PIXEL_ARRAYS)
        for t in self.meta.teachers:
            out |= {feature_path(t, kind, codes=codes) for kind in TOKEN_KINDS for codes in (False, True)}
            out |= {logits_path(t, part) for part in LOGIT_ARRAYS}
            out |= {dense_path(t), dense_path(t, codes=True)}
        return out

    def expected_arrays(self) -> dict[str, tuple[tuple, str]]:
        """Array path -> (row shape, zarr dtype), as the teacher metadata declares them."""
        k = self.meta.views
        out = {"views": ((k, 5), "float32"), ORIGIN: ((len(ORIGIN_COLUMNS),), "int64")}
        if self.meta.pixels is not None:
            out.update(self.meta.pixels.arrays(k))
        for t, m in self.meta.teachers.items():
            out.update({p: (shape, dtype) for p, (shape, dtype, _) in teacher_arrays(t, m, k).items()})
        return out

    def is_complete(self, name: str, teachers=None) -> bool:
        """Complete, and (if given) holding every one of ``teachers`` (a reader asks the shard
        index, a writer the shard)."""
        a = self.shard_summary(name)
        ok = bool(a) and a.get("complete") is True and all(has_teacher(a["digest"], t) for t in (teachers or ()))
        if not ok and a and a.get("indexed"):  # the index may predate a teacher added since: the shard decides
            a = self.shard_summary(name, indexed=False)
            ok = bool(a) and a.get("complete") is True and all(has_teacher(a["digest"], t) for t in (teachers or ()))
        return ok

    def stored_rows(self, name: str) -> int | None:
        """How many rows a shard's keys array holds, read without the shard's own metadata: what a
        shard refused for its metadata held (a run that skips it counts them); None if unreadable."""
        try:
            return int(self.root[f"{SHARDS}/{check_name(name, self.url, 'shard')}/keys"].shape[0])
        except Exception:  # noqa: BLE001 - anything: the count is then unknown
            return None

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
        return ShardWriter(group, teachers=teachers, views=self.meta.views, view_shards=self.meta.view_shards,
                           origin=self.meta.records_origin, pixels=self.meta.pixels)

    def extend_shard(self, name: str, teachers: dict[str, TeacherMeta], *, pixels: bool = False) -> ShardWriter:
        """Add teacher arrays (or, with ``pixels``, the views' pixels: ``kdcache store pixels``) to
        complete shard ``name`` (partial earlier attempts removed)."""
        self._need_writable()
        attrs = self.shard_attrs(name)
        if not attrs or not attrs.get("complete"):
            raise StoreError(f"{self.url}: shard {name} is not complete; cannot add teachers to it")
        group = self.root[f"{SHARDS}/{name}"]
        for t in [*teachers, *(["pixels"] if pixels else [])]:
            if t in group:
                del group[t]
        # the new arrays take the shard's own rows per block, so every array's block i holds the same rows
        return ShardWriter(group, teachers=teachers, views=self.meta.views, write_index=False,
                           expected_count=attrs["count"], view_shards=self.meta.view_shards,
                           block=self.block_rows(name, "views"), pixels=self.meta.pixels if pixels else None)

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
