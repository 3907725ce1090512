"""How cached arrays are laid out in Zarr: dtypes, codecs, chunk and shard shapes.

One Zarr v3 shard (one file or object) holds ``block`` samples of an array; inner chunks hold
a few samples, so a sequential read is a few large requests and a random read decodes one
small chunk. In a format-2 store an array with a view axis (``per_view``) has one Zarr shard
per (block, view): a loader that uses one view of a block reads that view's bytes only, in one
request. Writers append whole blocks, so every Zarr shard is written exactly once. The checks a
reader applies to every block it reads (CRC-32, finiteness) are in ``reads``.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import zarr
import zarr.codecs

from kdcache.errors import StoreError

from .meta import AUTO_CODEC, CODEC_REGISTRY

BLOCK_BYTES = 64 << 20  # one Zarr shard of the largest array: few requests, bounded memory
CHUNK_BYTES = 1 << 20  # inner chunk: a random read decodes about this much
MAX_BLOCK = 1024


def compressors(codec: str):
    """Codec name (``meta.CODEC_REGISTRY``) -> zarr v3 compressors."""
    try:
        c = CODEC_REGISTRY[codec]  # (``auto`` is resolved per array first: ``resolved_codec``)
    except KeyError:
        raise StoreError(f"codec {codec!r} is not one of {', '.join(CODEC_REGISTRY)}") from None
    return None if c.blosc is None else zarr.codecs.BloscCodec(cname=c.blosc, clevel=c.level, shuffle=c.shuffle)


AUTO_KEEPS = 0.95  # ``auto`` compresses an array whose first block lz4 stores in at most this share of its bytes
AUTO_PROBE = 4 << 20  # bytes of that block it tries


def resolved_codec(codec: str, first_rows: np.ndarray | None, *, chunk: int = 1) -> str:
    """The codec an array is written with: ``codec``, or for ``auto`` lz4 (Blosc, byte shuffle) when
    it stores the array's first block in at most 95% of what the block takes uncompressed, else
    none. Uncompressed, zarr stores a partial last inner chunk (``chunk`` rows) at full size: a
    shard smaller than one block pays that padding, which lz4 would compress away, so it counts.
    Dense transformer features do not compress (lz4 keeps 99.9% of MiniLM's token features) and lz4
    would cost every reader a decompression pass for nothing: a ViT-S/16 sample (148 KiB) read and
    checked in 15 us stored raw, where it is used in the memory it was read into, against 38 us
    through lz4 (measured: ``docs/benchmarks.md#codec``). Post-ReLU CNN maps and sparse arrays do
    compress (EfficientNet-Lite0's to about a quarter). No rows (an empty shard): none. (lz4 is
    tried on the block's first 4 MiB.)"""
    if codec != AUTO_CODEC:
        return codec
    if first_rows is None or first_rows.size == 0 or first_rows.dtype.kind not in "fiub":
        return "none"
    import numcodecs.blosc
    rows = np.ascontiguousarray(first_rows)
    data = rows.reshape(-1).view(np.uint8)[:AUTO_PROBE]
    c = CODEC_REGISTRY["lz4"]
    shuffle = numcodecs.blosc.SHUFFLE if c.shuffle == "shuffle" else numcodecs.blosc.NOSHUFFLE
    packed = numcodecs.blosc.compress(data, c.blosc.encode(), c.level, shuffle, rows.dtype.itemsize)
    uncompressed = -(-len(rows) // chunk) * chunk * (rows.nbytes // len(rows))
    return "lz4" if len(packed) / data.size * rows.nbytes <= AUTO_KEEPS * uncompressed else "none"


def block_rows(sample_bytes: int) -> int:
    """Samples per Zarr shard so that the largest array's shard is about BLOCK_BYTES."""
    return int(max(1, min(MAX_BLOCK, BLOCK_BYTES // max(1, sample_bytes))))


def chunk_rows(sample_bytes: int, block: int) -> int:
    """Samples per inner chunk (a divisor of ``block``), about CHUNK_BYTES each."""
    want = max(1, min(block, CHUNK_BYTES // max(1, sample_bytes)))
    while block % want:
        want -= 1
    return want


def create_rows_array(group, name: str, row_shape: tuple, dtype: str, *, block: int, codec: str,
                      attrs: dict | None = None, per_view: bool = False, first_rows: np.ndarray | None = None):
    """An array of shape (0, *row_shape) that grows along axis 0 by whole blocks; ``per_view``
    (axis 1 is the view axis): one Zarr shard per (block, view). A ``codec`` of ``auto`` is
    resolved from ``first_rows``, the array's first block (``resolved_codec``)."""
    shard_row = (1, *row_shape[1:]) if per_view and row_shape else tuple(row_shape)
    sample_bytes = math.prod(shard_row) * np.dtype(dtype).itemsize if dtype != str else 64
    chunk = chunk_rows(sample_bytes, block)
    codec = resolved_codec(codec, first_rows, chunk=chunk)
    kwargs = dict(shape=(0, *row_shape), dtype=dtype, chunks=(chunk, *shard_row), attributes=attrs or {})
    if dtype is str:
        kwargs["chunks"] = (block,)
    else:
        kwargs["shards"] = (block, *shard_row)
        kwargs["compressors"] = compressors(codec)
    return group.create_array(name, **kwargs)


HEAP_SHARD = 16 << 20  # bytes per Zarr shard of a byte heap (the JPEG views): written whole, once each
HEAP_CHUNK = 256 << 10  # bytes per inner chunk: a view's run of JPEGs is read in a few of them


def create_heap_array(group, name: str):
    """A 1-D uint8 array that grows by whole Zarr shards: JPEG bytes, placed by their spans. Blosc lz4
    without shuffle: JPEG bytes do not compress (Blosc keeps them as they are, a copy), but the
    padding of the array's last inner chunk, which zarr stores at full size, does."""
    return group.create_array(name, shape=(0,), dtype="uint8", chunks=(HEAP_CHUNK,), shards=(HEAP_SHARD,),
                              compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"))


def view_sharded(a) -> bool:
    """Whether each view of an array's blocks is a Zarr shard of its own (format 2, K > 1): read
    from the array's own metadata, so every reader reads what is there."""
    shards = getattr(a, "shards", None)
    return bool(shards) and a.ndim >= 2 and shards[1] == 1 and a.shape[1] > 1


def append_rows(arr, rows: np.ndarray) -> None:
    n = arr.shape[0]
    arr.resize((n + rows.shape[0], *arr.shape[1:]))
    arr[n:] = rows


def json_sha256(obj) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_digests(attrs: dict) -> dict:
    """The digests of the parts of a shard's record too long for the shard index: its block
    checksums and its failures (the index keeps these two digests beside the rest)."""
    return {"checksums": json_sha256(attrs.get("block_crc32")), "failed": json_sha256(attrs.get("failed", []))}


def binding_of(name: str, count, block, digest, checksums: str, failed: str) -> str:
    return json_sha256({"shard": name, "count": count, "block": block, "digest": digest, "checksums": checksums,
                        "failed": failed})


def shard_binding(name: str, attrs: dict) -> str:
    """sha256 of a complete shard's record bound to its name: its count, rows per block, every
    array's sha256 (the keys' among them), every block's CRC-32 and its failures. Arrays swapped
    between shards with their digests, a shard duplicated or renamed, a digest or checksum entry
    removed: the record no longer hashes to the binding written with it. The shard index keeps
    each shard's binding with the parts it hashes, so an entry is checked on its own too; the
    root metadata records the index's sha256, so that one digest pins every shard of a store.
    (Anyone who rewrites data, digests and bindings alike forges a store; pinning is the answer.)"""
    parts = record_digests(attrs)
    return binding_of(name, attrs.get("count"), attrs.get("block"), attrs.get("digest"), parts["checksums"],
                      parts["failed"])


def sealed(name: str, attrs: dict) -> dict:
    """A complete shard's attributes with their binding (every writer's last step)."""
    return {**attrs, "binding": shard_binding(name, attrs)}


class ArrayDigest:
    """sha256 of an array's rows in C order (strings: utf-8 joined by NUL), fed block by block."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, rows: np.ndarray) -> None:
        if rows.dtype.kind in "UOT":
            self._h.update(b"".join(str(k).encode("utf-8") + b"\0" for k in rows.tolist()))
        else:
            self._h.update(np.ascontiguousarray(rows).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest_array(arr) -> str:
    """Recompute an array's digest from what is stored, one Zarr shard (one request) at a time."""
    block = arr.shards[0] if getattr(arr, "shards", None) else arr.chunks[0]
    d = ArrayDigest()
    for start in range(0, arr.shape[0], block):
        d.update(np.asarray(arr[start:start + block]))
    return d.hexdigest()
