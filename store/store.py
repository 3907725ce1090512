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

from .codes import Codebooks, read_codebooks, write_codebooks
from .dtypes import to_float32
from .errors import CorruptShardError, StoreError
from .lease import LEASE_SECONDS, Leases
from .layout import ArrayDigest, all_finite, append_rows, crc32, create_rows_array, digest_array
from .meta import SHARDS, StoreMeta, TeacherMeta, feature_path, has_teacher, quantizer_path, stats_path, teacher_arrays
from .schema import check_name, check_shard_attrs
from .shard_writer import ShardWriter


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


async def _list_dir(store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


def _sync(coro):
    from zarr.core.sync import sync
    return sync(coro)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


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
            raise StoreError(f"{self.url}: shard {name}: metadata unreadable ({type(e).__name__}: {_first_line(e)})") from None
        return check_shard_attrs(attrs, f"{self.url}: shard {name}", array_paths=self.possible_arrays())

    def possible_arrays(self) -> set[str]:
        """Every array path a shard of this store may hold."""
        out = {"keys", "views"}
        for t in self.meta.teachers:
            out |= {feature_path(t, kind, codes=codes) for kind in ("cls", "patch") for codes in (False, True)}
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

    # -- reading ------------------------------------------------------------------------
    def array(self, shard: str, path: str):
        """The zarr array ``shards/<shard>/<path>`` (lazy; slicing reads). In a complete shard its
        shape and dtype must be what the shard's count and the teacher metadata declare."""
        if path not in self.possible_arrays():
            raise StoreError(f"{self.url}: shard {shard}: {path!r} is not an array of this store")
        try:
            a = self.root[f"{SHARDS}/{shard}/{path}"]
        except KeyError:
            raise StoreError(f"{self.url}: shard {shard} has no array {path!r}") from None
        except Exception as e:  # noqa: BLE001 - a broken array zarr.json
            raise StoreError(f"{self.url}: shard {shard}: {path}: metadata unreadable ({type(e).__name__}: {_first_line(e)})") from None
        block = int(a.shards[0] if getattr(a, "shards", None) else a.chunks[0]) if a.ndim else 1
        row_bytes = int(np.prod(a.shape[1:], dtype=np.int64)) * (np.dtype(a.dtype).itemsize if path != "keys" else 64)
        if block < 1 or block * max(1, row_bytes) > MAX_BLOCK_BYTES:
            raise StoreError(f"{self.url}: shard {shard}: {path}: blocks of {block} rows x {row_bytes} bytes exceed what "
                             f"kdcache reads at once ({MAX_BLOCK_BYTES} bytes)")
        attrs = self.shard_attrs(shard) or {}
        if attrs.get("complete") is True:
            count = attrs["count"]
            want = self.expected_arrays().get(path)
            if path == "keys":
                ok = tuple(a.shape) == (count,)
            elif want is not None:
                ok = tuple(a.shape) == (count, *want[0]) and np.dtype(a.dtype) == np.dtype(want[1])
            else:
                ok = a.shape[0] == count
            if not ok:
                declared = (count, *want[0]) if want else (count,)
                got = f"shape {tuple(a.shape)}" + (f" {a.dtype}" if want and np.dtype(a.dtype) != np.dtype(want[1]) else "")
                raise StoreError(f"{self.url}: shard {shard}: {path} has {got}, but the shard's count ({count}) and the "
                                 f"teacher metadata declare {declared}" + (f" {want[1]}" if want else ""))
        return a

    def keys(self, shard: str) -> np.ndarray:
        """The shard's sample keys, checked against their digest (small: read whole)."""
        keys = np.asarray(self.array(shard, "keys")[:].tolist(), dtype=str)  # StringDType -> plain str
        self._check_digest(shard, "keys", keys)
        return keys

    def views(self, shard: str) -> np.ndarray:
        """The shard's (n, K, 5) view boxes, checked against their digest."""
        views = np.asarray(self.array(shard, "views")[:])
        self._check_digest(shard, "views", views)
        if not all_finite(views):
            raise CorruptShardError(f"{self.url}: shard {shard}: views holds NaN or infinite values")
        return views

    def _check_digest(self, shard: str, path: str, rows: np.ndarray) -> None:
        attrs = self.shard_attrs(shard) or {}
        want = (attrs.get("digest") or {}).get(path)
        if attrs.get("complete") is True and want is not None:
            d = ArrayDigest()
            d.update(rows)
            if d.hexdigest() != want:
                raise CorruptShardError(f"{self.url}: shard {shard}: {path}: data does not match its digest")

    def block_rows(self, shard: str, path: str) -> int:
        """Rows per Zarr shard of an array: read it a block at a time (one request per block)."""
        a = self.array(shard, path)
        return int(a.shards[0] if getattr(a, "shards", None) else a.chunks[0])

    def array_nbytes(self, shard: str) -> dict[str, int]:
        """Bytes stored per array of a shard (chunks and array metadata), one listing."""
        try:
            group = self.root[f"{SHARDS}/{shard}"]
        except KeyError:
            return {}
        return {path: a.nbytes_stored() for path, a in group.members(max_depth=None) if hasattr(a, "nbytes_stored")}

    def read_features(self, shard: str, teacher: str, kind: str) -> np.ndarray:
        """A whole shard's float ``cls``/``patch`` features as float32 (bf16 bits widened), verified."""
        if teacher not in self.meta.teachers:
            raise StoreError(f"{self.url}: no teacher {teacher!r} (teachers: {', '.join(self.meta.teachers)})")
        path = feature_path(teacher, kind)
        blocks = range(-(-self.array(shard, path).shape[0] // self.block_rows(shard, path)))
        rows = [self.read_block(shard, path, b) for b in blocks]
        return to_float32(np.concatenate(rows) if rows else self.array(shard, path)[:0], self.meta.teachers[teacher].dtype)

    def read_block(self, shard: str, path: str, index: int, *, attrs: dict | None = None, array=None,
                   verify: bool = True) -> np.ndarray:
        """Rows of block ``index`` (one Zarr shard) of an array, checked before they are returned:
        readable, equal to the CRC-32 written with them (so a missing chunk read as fill values or
        a flipped byte is caught), and finite. Anything else is a CorruptShardError naming shard
        and array. Stores written before block checksums are checked against the whole-array
        digest instead, once per array (``verify_array``)."""
        attrs = attrs if attrs is not None else (self.shard_attrs(shard) or {})
        a = array if array is not None else self.array(shard, path)
        block = int(a.shards[0] if getattr(a, "shards", None) else a.chunks[0])
        start = index * block
        try:
            rows = np.asarray(a[start:start + block])
        except Exception as e:  # noqa: BLE001 - a truncated or garbled chunk fails inside the codec
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: block {index} unreadable "
                                    f"({type(e).__name__}: {_first_line(e)})") from None
        if not verify:  # only `kdcache bench load`, to measure what the checks cost
            return rows
        crcs = (attrs.get("block_crc32") or {}).get(path)
        if crcs is not None:
            if index >= len(crcs) or crc32(rows) != crcs[index]:
                raise CorruptShardError(f"{self.url}: shard {shard}: {path}: block {index} does not match the checksum "
                                        f"written with it (corrupt or missing chunk)")
        elif index == 0:
            self.verify_array(shard, path, attrs=attrs, array=a)
        if not all_finite(rows):
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: block {index} holds NaN or infinite values")
        return rows

    def verify_array(self, shard: str, path: str, *, attrs: dict | None = None, array=None) -> None:
        """The whole array against its sha256 digest (what ``verify`` does, for one array)."""
        attrs = attrs if attrs is not None else (self.shard_attrs(shard) or {})
        a = array if array is not None else self.array(shard, path)
        try:
            got = digest_array(a)
        except Exception as e:  # noqa: BLE001
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None
        if got != (attrs.get("digest") or {}).get(path):
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: data does not match its digest (corrupt or missing chunk)")

    # -- arrays derived from a complete shard (quantization) -----------------------------
    def derive_array(self, shard: str, src: str, dst: str, *, transform, row_shape: tuple, dtype: str, codec: str,
                     attrs: dict | None = None, keep_source: bool = False) -> bool:
        """Add array ``dst`` = ``transform(rows of src)`` to complete shard ``shard``, block by block.

        Crash-safe: ``dst`` is written in full, then one atomic attribute update adds it to the
        digest (and drops ``src`` from it unless ``keep_source``), then ``src`` is deleted. A
        rerun finds ``dst`` in the digest and only cleans up. Returns False if it was there."""
        self._need_writable()
        group = self.root[f"{SHARDS}/{shard}"]
        attrs_now = dict(group.attrs)
        digest = dict(attrs_now.get("digest", {}))
        if dst in digest:
            self._drop_unlisted(group, digest, src)
            return False
        if src not in digest:
            raise StoreError(f"{self.url}: shard {shard} has neither {src} nor {dst}")
        if dst in group:
            del group[dst]  # left by an interrupted run
        source = group[src]
        block = self.block_rows(shard, src)
        out = create_rows_array(group, dst, row_shape, dtype, block=block, codec=codec, attrs=attrs)
        h, crcs = ArrayDigest(), []
        for b, start in enumerate(range(0, source.shape[0], block)):
            rows = np.asarray(transform(self.read_block(shard, src, b)), dtype=dtype)
            h.update(rows)
            crcs.append(crc32(rows))
            append_rows(out, rows)
        digest[dst] = h.hexdigest()
        if not keep_source:
            digest.pop(src)
        new_attrs = {**attrs_now, "digest": digest}
        if "block_crc32" in attrs_now:
            new_attrs["block_crc32"] = {**{p: c for p, c in attrs_now["block_crc32"].items() if p in digest}, dst: crcs}
        group.attrs.put(new_attrs)  # the switch: one atomic metadata write
        self._drop_unlisted(group, digest, src)
        return True

    def drop_arrays(self, shard: str, paths: set[str]) -> bool:
        """Remove arrays from a shard: its digest and checksums first (one atomic write), then the
        arrays. Returns whether the shard held any of them."""
        self._need_writable()
        group = self.root[f"{SHARDS}/{shard}"]
        attrs = dict(group.attrs)
        present = [p for p in paths if p in group or p in attrs.get("digest", {})]
        if not present:
            return False
        attrs["digest"] = {p: d for p, d in attrs.get("digest", {}).items() if p not in paths}
        if "block_crc32" in attrs:
            attrs["block_crc32"] = {p: c for p, c in attrs["block_crc32"].items() if p not in paths}
        group.attrs.put(attrs)
        for p in present:
            if p in group:
                del group[p]
        teacher = {p.split("/", 1)[0] for p in present}
        for t in teacher:  # the teacher's now empty group
            if t in group and not list(group[t].array_keys()):
                del group[t]
        return True

    def drop_teacher_groups(self, teacher: str) -> None:
        """A teacher's quantizers and statistics."""
        self._need_writable()
        for path in (quantizer_path(teacher, "x").rsplit("/", 1)[0], stats_path(teacher, "x").rsplit("/", 1)[0]):
            if path in self.root:
                del self.root[path]

    @staticmethod
    def _drop_unlisted(group, digest, path):
        if path not in digest and path in group:
            del group[path]

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


MAX_BLOCK_BYTES = 1 << 31  # a block is read whole: bound what hostile array metadata can make us allocate


def leases_for(url: str, owner: str, *, seconds: float = LEASE_SECONDS, pid: int | None = None) -> Leases:
    """Leases of the store at ``url``, on a filesystem opened here (safe in a forked worker)."""
    fs, root = _filesystem(url)
    leases = Leases(fs, root, owner=owner, seconds=seconds)
    if pid is not None:
        leases.pid = pid
    return leases


def _filesystem(url: str):
    import fsspec.core
    if "://" in url and not url.startswith("file://"):
        return fsspec.core.url_to_fs(url)
    path = url[len("file://"):] if url.startswith("file://") else url
    return fsspec.filesystem("file"), os.path.abspath(path)


def ensure_group(root, path: str):
    """``require_group`` that tolerates another process creating the group at the same time."""
    try:
        return root.require_group(path)
    except ContainsGroupError:
        return root[path]
