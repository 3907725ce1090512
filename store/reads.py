"""The store's read verbs: arrays as the metadata declares them, and blocks checked as they are read.

A mixin of ``Store`` (it uses ``url``, ``root``, ``objects``, ``meta``, ``shard_attrs`` and the
array specs): everything a reader loads comes through here, so every reader checks the same way.
A block that cannot be decompressed, does not match the CRC-32 written with it, or holds NaN or
infinity is a ``CorruptShardError`` naming store, shard and array (and carrying the shard);
``keys`` and ``views`` are checked against their digests (the checks: ``store.checks``).
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import numpy as np

from kdcache.errors import CorruptShardError, StoreError, first_line

from .dtypes import to_float32
from .layout import ArrayDigest, digest_array, view_sharded
from . import zarr_shards
from .checks import all_finite, crc32
from .meta import ORIGIN, ORIGIN_COLUMNS, PIXEL_SPANS, PIXELS_JPEG, PIXELS_RAW, SHARDS, feature_path
from .objects import Objects

MAX_BLOCK_BYTES = 1 << 31  # a block is read whole: bound what hostile array metadata can make us allocate


class OpenedArrays:
    """What a reader opened last, kept: arrays, and the indexes of the JPEG heap's Zarr shards.
    Opening an array (its ``zarr.json`` read and parsed, through zarr's event loop) cost 0.35 ms,
    as much as reading and checking a 64-row block of summary features (measured), and a loader
    reads every array of every block it loads; a heap shard's index is a request of its own on
    object storage. Only a reader that plans with the shard index keeps them (it keeps each
    shard's attributes too: a store it reads is not rewritten under it); a writer opens an array
    whenever it asks."""

    def __init__(self, keep: int = 256):
        self.keep = keep
        self._kept: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()  # the loader's reading thread and its decoding thread both read

    def get(self, key: tuple):
        with self._lock:
            got = self._kept.get(key)
            if got is not None:
                self._kept.move_to_end(key)
            return got

    def put(self, key: tuple, value) -> None:
        with self._lock:
            self._kept[key] = value
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)


class VerifiedReads:
    def array(self, shard: str, path: str):
        """The zarr array ``shards/<shard>/<path>`` (lazy; slicing reads). In a complete shard its
        shape and dtype must be what the shard's count and the teacher metadata declare."""
        if path not in self.possible_arrays():
            raise StoreError(f"{self.url}: shard {shard}: {path!r} is not an array of this store")
        kept = self._opened.get((shard, path)) if self.use_index else None
        if kept is not None:
            return kept
        try:
            a = self.root[f"{SHARDS}/{shard}/{path}"]
        except KeyError:
            raise StoreError(f"{self.url}: shard {shard} has no array {path!r}") from None
        except Exception as e:  # noqa: BLE001 - a broken array zarr.json
            raise StoreError(f"{self.url}: shard {shard}: {path}: metadata unreadable ({type(e).__name__}: {first_line(e)})") from None
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
            elif path == PIXELS_JPEG:  # a byte heap: its length is its JPEGs' (the spans say where each lies)
                ok = a.ndim == 1 and np.dtype(a.dtype) == np.uint8
            elif want is not None:
                ok = tuple(a.shape) == (count, *want[0]) and np.dtype(a.dtype) == np.dtype(want[1])
            else:
                ok = a.shape[0] == count
            if not ok:
                declared = (count, *want[0]) if want else (count,)
                got = f"shape {tuple(a.shape)}" + (f" {a.dtype}" if want and np.dtype(a.dtype) != np.dtype(want[1]) else "")
                raise StoreError(f"{self.url}: shard {shard}: {path} has {got}, but the shard's count ({count}) and the "
                                 f"teacher metadata declare {declared}" + (f" {want[1]}" if want else ""))
            if self.use_index:  # (a complete shard's arrays only: an incomplete one is still being written)
                self._opened.put((shard, path), a)
        return a

    def keys(self, shard: str) -> np.ndarray:
        """The shard's sample keys, checked against their digest (small: read whole)."""
        keys = np.asarray(self._read_whole(shard, "keys").tolist(), dtype=str)  # StringDType -> plain str
        self._check_digest(shard, "keys", keys)
        return keys

    def views(self, shard: str) -> np.ndarray:
        """The shard's (n, K, 5) view boxes, checked against their digest."""
        views = np.asarray(self._read_whole(shard, "views"))
        self._check_digest(shard, "views", views)
        if not all_finite(views):
            raise CorruptShardError(f"{self.url}: shard {shard}: views holds NaN or infinite values", shard=shard)
        return views

    def origin(self, shard: str) -> np.ndarray | None:
        """The shard's (n, 4) int64 ``origin`` rows (each sample's image byte offset and length in its
        corpus shard, their CRC-32, its label or -1), checked against their digest; None for a shard
        written before they were recorded (store format 3)."""
        attrs = self.shard_attrs(shard) or {}
        if ORIGIN not in (attrs.get("digest") or {}):
            return None
        rows = np.asarray(self._read_whole(shard, ORIGIN), dtype=np.int64)
        self._check_digest(shard, ORIGIN, rows)
        if rows.ndim != 2 or rows.shape[1] != len(ORIGIN_COLUMNS) or (rows[:, :2] < -1).any() or (rows[:, 2] < -1).any() \
                or (rows[:, 2] >= 1 << 32).any():
            raise CorruptShardError(f"{self.url}: shard {shard}: {ORIGIN} holds values no writer records", shard=shard)
        return rows

    def _read_whole(self, shard: str, path: str) -> np.ndarray:
        """A small array read whole, each of its blocks in one request (``block_in_one_request``:
        zarr's own ``a[:]`` reads a partial shard, the usual case for keys and views, one inner
        chunk per request)."""
        a = self.array(shard, path)
        try:
            block = _block_of(a)
            parts = [block_in_one_request(self.objects, a, b, block) for b in range(-(-a.shape[0] // block))]
            return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else a[:0])
        except Exception as e:  # noqa: BLE001 - a truncated or garbled chunk fails inside the codec
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: unreadable ({type(e).__name__}: "
                                    f"{_printable(first_line(e))})", shard=shard) from None

    def _check_digest(self, shard: str, path: str, rows: np.ndarray) -> None:
        attrs = self.shard_attrs(shard) or {}
        want = (attrs.get("digest") or {}).get(path)
        if attrs.get("complete") is True and want is not None:
            d = ArrayDigest()
            d.update(rows)
            if d.hexdigest() != want:
                raise CorruptShardError(f"{self.url}: shard {shard}: {path}: data does not match its digest", shard=shard)

    def block_rows(self, shard: str, path: str, *, array=None) -> int:
        """Rows per Zarr shard of an array: read it a block at a time (one request per block).
        ``array``: the array already opened (``array(shard, path)``), not opened again."""
        return _block_of(array if array is not None else self.array(shard, path))

    def read_blocks(self, shard: str, path: str, *, view: int | None = None):
        """Every block of an array in order, each checked by ``read_block`` (``view``: that view's
        rows only); the shard's attributes and the array are opened once for all of them."""
        attrs, a = self.shard_attrs(shard) or {}, self.array(shard, path)
        for b in range(-(-a.shape[0] // _block_of(a))):
            yield self.read_block(shard, path, b, attrs=attrs, array=a, view=view)

    def read_pixels(self, shard: str, start: int, stop: int, *, view: int, attrs: dict | None = None,
                    verify: bool = True, buffers: "BlockBuffers | None" = None):
        """The stored pixels of view ``view`` of rows ``start:stop`` (``extract --pixels``): raw, an
        (n, H, W, 3) uint8 array; JPEG, a list of n JPEG byte strings. Every block they touch is read
        whole and checked: its spans (where each JPEG lies: contiguous, within the heap) and the
        CRC-32 of its view's run of JPEG bytes, so a damaged JPEG is refused before it is decoded."""
        if self.meta.pixels is None:
            raise StoreError(f"{self.url}: the store holds no pixels (extract --pixels, or kdcache store pixels)")
        attrs = attrs if attrs is not None else (self.shard_attrs(shard) or {})
        if self.meta.pixels.format == "raw":
            return self.read_span(shard, PIXELS_RAW, start, stop, attrs=attrs, verify=verify, view=view, buffers=buffers)
        spans_array, heap = self.array(shard, PIXEL_SPANS), self.array(shard, PIXELS_JPEG)
        block, k = _block_of(spans_array), spans_array.shape[1]
        out = []
        for b in range(start // block, (max(start, stop - 1)) // block + 1):
            spans = self.read_block(shard, PIXEL_SPANS, b, attrs=attrs, array=spans_array, verify=verify, view=view)
            run = self._jpeg_run(shard, heap, spans, b, view, k, attrs, verify)
            first = b * block
            for r in range(max(start, first), min(stop, first + len(spans))):
                a = int(spans[r - first, 0] - spans[0, 0])
                out.append(run[a:a + int(spans[r - first, 1])].tobytes())
        return out

    def _jpeg_run(self, shard: str, heap, spans: np.ndarray, block: int, view: int, k: int, attrs: dict,
                  verify: bool) -> np.ndarray:
        """The JPEG bytes of one (block, view), contiguous in the heap, read and checked."""
        where = f"{self.url}: shard {shard}: {PIXELS_JPEG}: block {block} view {view}"
        starts, lengths = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
        if len(spans) == 0:
            return np.zeros(0, np.uint8)
        ends = starts + lengths
        if (lengths < 0).any() or starts[0] < 0 or (starts[1:] != ends[:-1]).any() or ends[-1] > heap.shape[0] or \
                int(ends[-1] - starts[0]) > MAX_BLOCK_BYTES:
            raise CorruptShardError(f"{where}: its spans are not a contiguous run inside the heap ({heap.shape[0]} "
                                    f"bytes)", shard=shard)
        try:
            run = self._heap_bytes(shard, heap, int(starts[0]), int(ends[-1]))
        except Exception as e:  # noqa: BLE001 - a truncated or garbled chunk fails inside the codec
            raise CorruptShardError(f"{where}: unreadable ({type(e).__name__}: {_printable(first_line(e))})",
                                    shard=shard) from None
        if verify:
            crcs = (attrs.get("block_crc32") or {}).get(PIXELS_JPEG)
            at = block * k + view
            if crcs is None or at >= len(crcs) or crc32(run) != crcs[at]:
                raise CorruptShardError(f"{where} does not match the checksum written with it (corrupt or missing "
                                        f"bytes)", shard=shard)
        return run

    def _heap_bytes(self, shard: str, heap, lo: int, hi: int) -> np.ndarray:
        """Bytes ``lo:hi`` of a JPEG heap: per Zarr shard they touch, its index (kept by a reader)
        and one ranged read of the inner chunks holding them (``zarr_shards.decode_rows``); zarr's
        own slice went through its event loop per inner chunk (1.0 ms for a block's 64 views of 3 KB,
        against 0.15 ms here; measured). A layout kdcache does not write, or a missing shard object,
        is read by zarr's own ``Array`` (a missing object reads as fill values and fails the CRC)."""
        meta, layout = array_layout(heap)
        if layout is None or heap.ndim != 1:
            return np.asarray(heap[lo:hi])
        per_shard, parts = int(layout["shard_shape"][0]), []
        for k in range(lo // per_shard, (hi - 1) // per_shard + 1):
            key = f"{heap.path}/{zarr_shards.chunk_key(meta, (k,))}"
            spans = self._opened.get((shard, key)) if self.use_index else None
            if spans is None:
                tail = self.objects.get_range(key, -zarr_shards.index_size(layout))
                if tail is None:
                    return np.asarray(heap[lo:hi])
                spans = zarr_shards.read_index(layout, tail)
                if self.use_index:
                    self._opened.put((shard, key), spans)
            first = k * per_shard
            parts.append(zarr_shards.decode_rows(layout, spans, lambda s, e, key=key: self.objects.get_range(key, s, e),
                                                 max(lo, first) - first, min(hi, first + per_shard) - first))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_span(self, shard: str, path: str, start: int, stop: int, *, attrs: dict | None = None, array=None,
                  verify: bool = True, view: int | None = None, buffers: "BlockBuffers | None" = None) -> np.ndarray:
        """Rows ``start:stop`` of an array, through ``read_block`` (every block they touch read whole and
        checked): a view of the one block when they lie in one (the usual case: a loader's block is
        the store's), else the blocks' rows joined."""
        a = array if array is not None else self.array(shard, path)
        block = _block_of(a)
        first, last = start // block, (max(start, stop - 1)) // block
        parts = [self.read_block(shard, path, b, attrs=attrs, array=a, verify=verify, view=view, buffers=buffers)
                 for b in range(first, last + 1)]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return rows[start - first * block:stop - first * block]

    def array_nbytes(self, shard: str) -> dict[str, int]:
        """Bytes stored per array of a shard (chunks and array metadata), one listing."""
        try:
            group = self.root[f"{SHARDS}/{shard}"]
        except KeyError:
            return {}
        return {path: a.nbytes_stored() for path, a in group.members(max_depth=None) if hasattr(a, "nbytes_stored")}

    def read_features(self, shard: str, teacher: str, kind: str, *, view: int | None = None) -> np.ndarray:
        """A whole shard's float ``cls``/``patch`` features as float32 (bf16 bits widened), verified:
        (n, K, ...), or (n, ...) of one ``view`` (in a format-2 store only that view is read)."""
        if teacher not in self.meta.teachers:
            raise StoreError(f"{self.url}: no teacher {teacher!r} (teachers: {', '.join(self.meta.teachers)})")
        path = feature_path(teacher, kind)
        rows = list(self.read_blocks(shard, path, view=view))
        if not rows:  # (an empty shard: its array opened once more for the shape)
            rows = [self.array(shard, path)[:0] if view is None else self.array(shard, path)[:0, 0]]
        return to_float32(np.concatenate(rows), self.meta.teachers[teacher].dtype)

    def read_block(self, shard: str, path: str, index: int, *, attrs: dict | None = None, array=None,
                   verify: bool = True, view: int | None = None, buffers: "BlockBuffers | None" = None) -> np.ndarray:
        """Rows of block ``index`` of an array, checked before they are returned: readable, equal
        to the CRC-32 written with them (so a missing chunk read as fill values or a flipped byte
        is caught), and finite. Anything else is a CorruptShardError naming shard and array.
        ``view``: that view's rows only, (rows, ...): in a format-2 store one Zarr shard, 1/K of the
        block's bytes, read and checked alone; None: every view, (rows, K, ...). Stores written
        before block checksums are checked against the whole-array digest instead, once per array
        (``verify_array``). ``buffers``: decode into reused memory (``BlockBuffers``)."""
        attrs = attrs if attrs is not None else (self.shard_attrs(shard) or {})
        a = array if array is not None else self.array(shard, path)
        if not view_sharded(a):
            rows = self._checked_shard(shard, path, a, index, None, attrs, verify, buffers)
            return rows if view is None else rows[:, view]
        if view is not None:
            return self._checked_shard(shard, path, a, index, view, attrs, verify, buffers)[:, 0]
        # every view (--view-choice all): each decoded into reused memory, free again once concatenated
        return np.concatenate([self._checked_shard(shard, path, a, index, v, attrs, verify, buffers)
                               for v in range(a.shape[1])], axis=1)

    def _checked_shard(self, shard: str, path: str, a, index: int, view: int | None, attrs: dict,
                       verify: bool, buffers: "BlockBuffers | None" = None) -> np.ndarray:
        """One Zarr shard: block ``index`` (``view`` None), or its view ``view`` (format 2), checked."""
        block = _block_of(a)
        where = f"block {index}" + (f" view {view}" if view is not None else "")
        try:
            rows = block_in_one_request(self.objects, a, index, block, view or 0, buffers)
        except Exception as e:  # noqa: BLE001 - a truncated or garbled chunk fails inside the codec
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: {where} unreadable "
                                    f"({type(e).__name__}: {_printable(first_line(e))})", shard=shard) from None
        if not verify:  # only `kdcache bench load`, to measure what the checks cost
            return rows
        crcs = (attrs.get("block_crc32") or {}).get(path)
        if crcs is not None:
            at = index if view is None else index * a.shape[1] + view
            if at >= len(crcs) or crc32(rows) != crcs[at]:
                raise CorruptShardError(f"{self.url}: shard {shard}: {path}: {where} does not match the checksum "
                                        f"written with it (corrupt or missing chunk)", shard=shard)
        elif view is not None:  # format 2 has always had block checksums: a per-view array without them was altered
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: no block checksums, though each view is a Zarr "
                                    f"shard of its own (format 2 writes them)", shard=shard)
        elif index == 0:
            self.verify_array(shard, path, attrs=attrs, array=a)
        if not all_finite(rows):
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: {where} holds NaN or infinite values",
                                    shard=shard)
        return rows

    def verify_array(self, shard: str, path: str, *, attrs: dict | None = None, array=None) -> None:
        """The whole array against its sha256 digest (what ``verify`` does, for one array)."""
        attrs = attrs if attrs is not None else (self.shard_attrs(shard) or {})
        a = array if array is not None else self.array(shard, path)
        try:
            got = digest_array(a)
        except Exception as e:  # noqa: BLE001
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: unreadable ({type(e).__name__}: "
                                    f"{_printable(first_line(e))})", shard=shard) from None
        if got != (attrs.get("digest") or {}).get(path):
            raise CorruptShardError(f"{self.url}: shard {shard}: {path}: data does not match its digest (corrupt or missing "
                                    f"chunk)", shard=shard)


def block_in_one_request(objects: Objects, a, index: int, block: int, view: int = 0,
                         buffers: "BlockBuffers | None" = None) -> np.ndarray:
    """Rows of block ``index`` of a sharded array (of its view ``view`` when each view is a Zarr
    shard of its own: then (rows, 1, ...)), its Zarr shard fetched whole in one request
    (``objects``: the store's objects) and decoded from memory by ``zarr_shards``, from the
    array's published metadata. zarr-python 3.1 fetches a shard whole only when the selection
    covers all its inner chunks; the last block of an array (every block of a small shard) does
    not, and is then read one inner chunk per request: 23 requests for a 64-row block, 1 here
    (measured on the loopback S3 server). A layout kdcache does not write, an unsharded array, or
    a missing shard object is read by zarr's own ``Array`` (a missing object reads as the fill
    value and fails the block's checksum)."""
    where = (slice(index * block, (index + 1) * block),)
    if not getattr(a, "shards", None):
        return np.asarray(a[where])
    per_view = view_sharded(a)
    if per_view:
        where += (slice(view, view + 1),)
    meta, layout = array_layout(a)
    if layout is not None:
        coords = (index, view if per_view else 0) + (0,) * (a.ndim - 2) if a.ndim > 1 else (index,)
        # rows stored uncompressed are used where they were read (into memory the buffers track), not copied
        in_place = buffers is not None and not layout["blosc"]
        raw = objects.get(f"{a.path}/{zarr_shards.chunk_key(meta, coords)}", limit=MAX_BLOCK_BYTES + (1 << 24),
                          reuse=True, into=buffers.empty if in_place else None)
        if raw is not None:
            rows = min(block, a.shape[0] - index * block)
            return zarr_shards.decode(layout, raw, rows, None if buffers is None else buffers.empty,
                                      in_place=in_place and raw.flags.writeable)
    return np.asarray(a[where])


class BlockBuffers:
    """Memory to decode blocks into, reused once no array made from it is alive.

    A block is about 64 MB; a fresh array per block is a fresh mapping the kernel faults in page
    by page as it is decoded, and unmaps when the block is dropped. In the training loader's
    worker that is one thread mapping and another unmapping, about every 256 samples, while its
    decoding thread allocates too: the process's memory map is locked for each, and its CPU time
    went to the kernel (the reading thread's time was two-thirds kernel time, measured). A
    buffer here is handed out again only when nothing refers to it but this pool: every array
    made from it (a block, its rows, a tensor over a row) holds a reference to it, so the
    reference count says when the last sample of a block has been copied into its batch. At most
    ``keep`` free buffers are kept; more live at once (a shuffle buffer holding rows of many
    blocks) are allocated and dropped as before."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._buffers: list[np.ndarray] = []
        self._probe = np.empty(0, dtype=np.uint8)  # held as a free buffer is held: its count is a free buffer's
        self._lock = threading.Lock()  # the reading thread and the decoding thread (a block not read ahead) both ask

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        with self._lock:
            # counted side by side with the probe, not against a constant: what the interpreter adds to a
            # count (the argument, the loop's name; borrowed references in newer CPythons) is the same for both
            counts = [sys.getrefcount(b) for b in (self._probe, *self._buffers)]
            free = [b for b, n in zip(self._buffers, counts[1:]) if n <= counts[0]]
            fit = min((b for b in free if b.size >= nbytes), key=lambda b: b.size, default=None)
            if fit is None:
                if len(free) >= self.keep:  # make room: drop the smallest free buffer
                    self._buffers.remove(min(free, key=lambda b: b.size))
                fit = np.empty(max(nbytes, 1), dtype=np.uint8)
                self._buffers.append(fit)
            return fit[:nbytes].view(dtype).reshape(shape)


_LAYOUTS: dict[int, tuple] = {}  # id(metadata) -> (the metadata, its document, its shard layout)


def array_layout(a) -> tuple[dict, dict | None]:
    """An opened zarr array's metadata document (``zarr.json`` as a dict) and its
    ``zarr_shards.shard_layout``, made once per metadata object: zarr's metadata is immutable (a
    resize makes a new one), and ``to_dict`` took about 20 µs per array per block read, 3.6 µs of
    every sample in the loader's reading thread at 64-row ViT-S/16 blocks (measured). The document
    returned is shared: read it, do not change it."""
    metadata = a.metadata
    hit = _LAYOUTS.get(id(metadata))
    if hit is not None and hit[0] is metadata:  # (the entry holds the object: its id is not reused meanwhile)
        return hit[1], hit[2]
    meta = metadata.to_dict()
    layout = zarr_shards.shard_layout(meta)
    if len(_LAYOUTS) >= 1024:  # arrays opened over a long run: start again rather than grow
        _LAYOUTS.clear()
    _LAYOUTS[id(metadata)] = (metadata, meta, layout)
    return meta, layout


def _block_of(a) -> int:
    return int(a.shards[0] if getattr(a, "shards", None) else a.chunks[0])


def _printable(text: str) -> str:
    """A library's error message without raw bytes or control characters (it is shown in one line)."""
    return "".join(c if c.isprintable() else "?" for c in text)
