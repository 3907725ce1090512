"""Writes one store shard: rows appended in corpus order, ``complete`` written last.

A shard is written by exactly one process. Rows are buffered and written one Zarr shard
(``block`` samples) at a time; each array's sha256 (``digest``, what ``verify`` checks) and a
CRC-32 per block, or per (block, view) when each view is a Zarr shard of its own
(``block_crc32``, what loaders check on every block they read: cheap enough for the hot path)
are computed from the very bytes written, and the shard's attributes (count, failed, digest,
block_crc32, complete) are written in a single final metadata update, so a reader either sees
a finished shard or an incomplete one.
"""
from __future__ import annotations

import numpy as np

from kdcache.errors import StoreError

from .dtypes import itemsize
from .layout import ArrayDigest, append_rows, block_rows, create_heap_array, create_rows_array, sealed
from .meta import (ORIGIN, ORIGIN_COLUMNS, PIXEL_SPANS, PIXELS_JPEG, PIXELS_RAW, PixelSpec, TeacherMeta, per_view_shards,
                   teacher_arrays)
from .checks import block_crcs, bytes_crc32


class ShardWriter:
    """Append rows to a store shard, then ``finish()`` it.

    Args:
        group: the shard's zarr group (new, or a complete shard when ``write_index=False``).
        teachers: the teachers whose ``cls``/``patch`` arrays this writer creates.
        views: K, the number of stored views per sample.
        write_index: create ``keys``/``views`` too (a new shard) or only teacher arrays (adding
            teachers to a complete shard, whose keys and views are already there).
        expected_count: when adding teachers, the shard's existing row count to match.
        view_shards: each view of a block of the teachers' per-view arrays in a Zarr shard of its
            own (format 2: ``StoreMeta.view_shards``); off, a block holds every view (format 1).
        origin: a new shard also records where each sample's image is in its corpus shard (format 3:
            ``append`` then takes ``origin`` rows: offset, size, CRC-32, label).
        block: rows per block (Zarr shard); default from the teachers' bytes per sample. Teachers
            added to a shard take the shard's own, so block i of every array holds the same rows.
        pixels: also every view's pixels (``extract --pixels``, ``kdcache store pixels``): ``append``
            takes ``pixels/raw`` rows, or ``pixels/jpeg`` rows (n lists of K JPEG byte strings),
            whose bytes are laid out per (block, view) in a heap and placed by ``pixels/spans``.
    """

    def __init__(self, group, *, teachers: dict[str, TeacherMeta], views: int, write_index: bool = True,
                 expected_count: int | None = None, view_shards: bool = True, origin: bool = False,
                 block: int | None = None, pixels: PixelSpec | None = None):
        self.group = group
        self.views = views
        self.write_index = write_index
        self.expected_count = expected_count
        self.count = 0
        self.failed: list[dict] = []
        sample_bytes = max([1] + [t.tokens * t.dim * views * itemsize(t.dtype) for t in teachers.values()])
        # (float bytes even for codes: blocks then line up with those of an fp16 store)
        self.block = block or block_rows(sample_bytes)
        self._arrays: dict[str, object] = {}  # path -> zarr array, once its first block is written (``auto`` reads it)
        self._specs: dict[str, tuple] = {}  # path -> (row shape, dtype, codec, attrs, per view)
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._digests: dict[str, ArrayDigest] = {}
        self._crcs: dict[str, list[int]] = {}
        self._per_view: set[str] = set()
        if write_index:
            self._add("keys", (), str, codec="none")
            self._add("views", (views, 5), "float32", codec="none")
            if origin:
                self._add(ORIGIN, (len(ORIGIN_COLUMNS),), "int64", codec="none")
        for name, t in teachers.items():
            for path, (row_shape, dtype, attrs) in teacher_arrays(name, t, views).items():
                self._add(path, row_shape, dtype, codec=t.codec, attrs=attrs,
                          per_view=per_view_shards(path, views=views, view_shards=view_shards))
        self._heap = None  # the JPEG heap: (array, bytes not yet written, bytes in it so far)
        if pixels is not None:
            for path, (row_shape, dtype) in pixels.arrays(views).items():  # raw pixels, or the JPEGs' spans
                self._add(path, row_shape, dtype, codec="lz4" if path == PIXELS_RAW else "none",
                          per_view=per_view_shards(path, views=views, view_shards=view_shards))
            if pixels.format == "jpeg":
                self._heap = [create_heap_array(self.group, PIXELS_JPEG), bytearray(), 0]
                self._buffers[PIXELS_JPEG] = []
                self._digests[PIXELS_JPEG] = ArrayDigest()
                self._crcs[PIXELS_JPEG] = []

    def _add(self, path, row_shape, dtype, *, codec, attrs=None, per_view=False):
        self._specs[path] = (tuple(row_shape), dtype, codec, attrs, per_view)  # created with its first block
        if per_view:
            self._per_view.add(path)
        self._buffers[path] = []
        self._digests[path] = ArrayDigest()
        self._crcs[path] = []

    def _create(self, path: str, first_rows: np.ndarray | None):
        """The array ``path``, created now, with its first block (an ``auto`` codec is chosen from it)."""
        row_shape, dtype, codec, attrs, per_view = self._specs[path]
        self._arrays[path] = create_rows_array(self.group, path, row_shape, dtype, block=self.block, attrs=attrs,
                                               codec=codec, per_view=per_view, first_rows=first_rows)
        return self._arrays[path]

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Append the same number of rows to every array (``rows[path]``, path as in the store). A
        writer that records ``origin`` and is given none (a store not extracted from a corpus: the
        benchmarks' synthetic and text stores) records -1, unknown, for every column."""
        if ORIGIN in self._specs and ORIGIN not in rows and "keys" in rows:
            rows = {**rows, ORIGIN: np.full((len(rows["keys"]), len(ORIGIN_COLUMNS)), -1, np.int64)}
        given = set(self._specs) - {PIXEL_SPANS} | ({PIXELS_JPEG} if self._heap else set())  # (spans: computed here)
        if set(rows) != given:
            raise StoreError(f"shard {self.group.path}: rows for {sorted(rows)} but arrays are {sorted(given)}")
        n = {len(v) for v in rows.values()}
        if len(n) != 1:
            raise StoreError(f"shard {self.group.path}: ragged append {({k: len(v) for k, v in rows.items()})}")
        if self._heap is not None:
            jpegs = rows[PIXELS_JPEG]
            if any(len(r) != self.views for r in jpegs):
                raise StoreError(f"shard {self.group.path}: {PIXELS_JPEG} rows must hold {self.views} JPEGs each")
            self._buffers[PIXELS_JPEG].extend(jpegs)
            rows = {p: v for p, v in rows.items() if p != PIXELS_JPEG}
        for path, v in rows.items():
            want = self._specs[path][0]
            if path != "keys" and tuple(v.shape[1:]) != tuple(want):
                raise StoreError(f"shard {self.group.path}: {path} rows have shape {tuple(v.shape[1:])}, store expects {tuple(want)}")
            self._buffers[path].append(v)
        self.count += n.pop()
        if self._buffered() >= self.block:
            self._flush(final=False)

    def add_failed(self, key: str, error: str) -> None:
        self.failed.append({"key": key, "error": error})

    def _buffered(self) -> int:
        if self._heap is not None:  # (the spans are made at a flush: the JPEGs waiting say how many rows do)
            return len(self._buffers[PIXELS_JPEG])
        first = next(iter(self._buffers.values()), [])
        return sum(len(b) for b in first)

    def _flush(self, *, final: bool) -> None:
        if self._heap is not None:
            self._lay_out_jpegs(final=final)
        for path, bufs in self._buffers.items():
            if not bufs or path == PIXELS_JPEG:
                continue
            rows = np.concatenate(bufs) if len(bufs) > 1 else bufs[0]
            cut = len(rows) if final else (len(rows) // self.block) * self.block
            head, tail = rows[:cut], rows[cut:]
            if len(head):
                if path == "keys":
                    head = np.asarray(head, dtype=str)
                else:  # checksum the bytes as stored, in the array's dtype
                    head = np.asarray(head, dtype=self._specs[path][1])
                    for i in range(0, len(head), self.block):
                        self._crcs[path] += block_crcs(head[i:i + self.block], per_view=path in self._per_view)
                self._digests[path].update(head)
                array = self._arrays.get(path)
                append_rows(self._create(path, head[:self.block]) if array is None else array, head)
            self._buffers[path] = [tail] if len(tail) else []

    def _lay_out_jpegs(self, *, final: bool) -> None:
        """The JPEGs of whole blocks (all of them when ``final``) into the heap, view by view: each
        (block, view) one contiguous run, with its CRC-32 and its rows' spans (offset, length). The
        heap is written one whole Zarr shard at a time, so every shard object is written once."""
        jpegs, (heap, pending, length) = self._buffers[PIXELS_JPEG], self._heap
        cut = len(jpegs) if final else (len(jpegs) // self.block) * self.block
        spans = []
        for b in range(0, cut, self.block):
            rows = jpegs[b:b + self.block]
            views = len(rows[0]) if rows else 0
            block_spans = np.zeros((len(rows), views, 2), np.int64)
            for v in range(views):
                run = b"".join(bytes(r[v]) for r in rows)
                self._crcs[PIXELS_JPEG].append(bytes_crc32(run))
                offset = length
                for i, r in enumerate(rows):
                    block_spans[i, v] = (offset, len(r[v]))
                    offset += len(r[v])
                pending += run
                length += len(run)
            spans.append(block_spans)
        if spans:
            self._buffers[PIXEL_SPANS].append(np.concatenate(spans))
        self._buffers[PIXELS_JPEG] = jpegs[cut:]
        shard = heap.shards[0]
        full = len(pending) if final else (len(pending) // shard) * shard
        if full:
            data = np.frombuffer(bytes(pending[:full]), dtype=np.uint8)
            self._digests[PIXELS_JPEG].update(data)
            append_rows(heap, data)
            del pending[:full]
        self._heap = [heap, pending, length]

    def finish(self) -> dict:
        """Write the remaining rows, then the shard attributes, ``complete`` included, last."""
        self._flush(final=True)
        for path in self._specs.keys() - self._arrays.keys():  # an array that got no rows (an empty shard)
            self._create(path, None)
        if self.expected_count is not None and self.count != self.expected_count:
            raise StoreError(f"shard {self.group.path}: wrote {self.count} rows for a shard of {self.expected_count}")
        digests = {p: d.hexdigest() for p, d in self._digests.items()}
        crcs = {p: c for p, c in self._crcs.items() if p != "keys"}
        attrs = dict(self.group.attrs)
        if self.write_index:
            attrs.update(count=self.count, failed=self.failed, digest=digests, block_crc32=crcs, block=self.block,
                         complete=True)
        else:
            attrs["digest"] = {**attrs.get("digest", {}), **digests}
            if "block_crc32" in attrs:  # a store written before block checksums keeps verifying by digest
                attrs["block_crc32"] = {**attrs["block_crc32"], **crcs}
        if attrs.get("complete") is True:  # bound to its name, over everything above (layout.shard_binding)
            attrs = sealed(self.group.path.rsplit("/", 1)[-1], attrs)
        # One metadata write: zarr's local store replaces zarr.json atomically.
        self.group.attrs.put(attrs)
        return attrs
