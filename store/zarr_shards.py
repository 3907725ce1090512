"""One Zarr v3 shard, decoded from its bytes by the published format alone.

A loader reads a block of rows: one Zarr shard of an array (``layout``: a Zarr shard per block, or
per (block, view)). zarr-python reads it through its async pipeline, inner chunk by inner chunk,
then copies; before 3.3 it also fetched a partial shard one inner chunk per request. Here the
shard object is fetched whole in one request (``objects.Objects``) and decoded straight into one
array, for the layout kdcache writes: the ``sharding_indexed`` codec with its index at the end
(``index_codecs`` bytes + crc32c), inner chunks of whole rows encoded by ``bytes`` (little endian)
and at most one ``blosc``. Everything is read from the array's metadata document as the Zarr v3
specification defines it (``zarr.json``: ``chunk_key_encoding``, ``codecs``, ``fill_value``), not
from zarr-python's classes, so a zarr release cannot change what it reads. Any other layout
returns None and the caller reads through zarr's own ``Array``. zarr-python 3.1 decodes the same
bytes about 2.8x slower (its async pipeline per inner chunk, then a copy: 6.7 against 2.8 ms for a
4.8 MB block, measured); the loader reads every target through here. The test suite decodes every layout
kdcache writes both ways and compares (``tests/store/test_zarr_shards.py``).
"""
from __future__ import annotations

import math

import numpy as np

EMPTY = 2**64 - 1  # a shard index's (offset, nbytes) of an inner chunk never written


def chunk_key(meta: dict, coords: tuple[int, ...]) -> str:
    """The key of a chunk (a Zarr shard) relative to its array, by ``chunk_key_encoding``."""
    enc = meta.get("chunk_key_encoding") or {"name": "default"}
    name = enc.get("name") if isinstance(enc, dict) else enc
    config = enc.get("configuration", {}) if isinstance(enc, dict) else {}
    if name == "v2":
        sep = config.get("separator", ".")
        return sep.join(map(str, coords)) if coords else "0"
    if name != "default":
        raise ValueError(f"chunk key encoding {name!r} is not one the Zarr v3 specification defines")
    sep = config.get("separator", "/")
    return sep.join(("c", *map(str, coords)))


def shard_layout(meta: dict) -> dict | None:
    """What ``decode`` needs of an array written as kdcache writes it, else None: rows per inner
    chunk, the shard's shape, the numpy dtype, Blosc or none, the fill value."""
    codecs = meta.get("codecs") or []
    if (meta.get("chunk_grid") or {}).get("name") != "regular":  # (zarr 3.2 adds rectilinear grids)
        return None
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0].get("configuration", {})
    inner = config.get("codecs", [])
    index = config.get("index_codecs", [])
    dtype = meta.get("data_type")
    shard_shape = tuple(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", ()))
    chunk_shape = tuple(config.get("chunk_shape", ()))
    if (not inner or inner[0].get("name") != "bytes" or inner[0].get("configuration", {}).get("endian", "little") != "little"
            or len(inner) > 2 or any(c.get("name") != "blosc" for c in inner[1:])
            or [c.get("name") for c in index] != ["bytes", "crc32c"]
            or index[0].get("configuration", {}).get("endian", "little") != "little"
            or config.get("index_location", "end") != "end" or not isinstance(dtype, str)
            or len(chunk_shape) != len(shard_shape) or chunk_shape[1:] != shard_shape[1:] or not chunk_shape):
        return None
    try:
        np_dtype = np.dtype(dtype).newbyteorder("<")
    except TypeError:
        return None
    if np_dtype.kind not in "fiub":
        return None
    return {"per_chunk": int(chunk_shape[0]), "shard_shape": shard_shape, "dtype": np_dtype, "blosc": len(inner) == 2,
            "fill_value": meta.get("fill_value", 0)}


def index_size(layout: dict) -> int:
    """Bytes of a shard's index (at its end): 16 per inner chunk, and its CRC-32C."""
    return -(-int(layout["shard_shape"][0]) // layout["per_chunk"]) * 16 + 4


def read_index(layout: dict, tail: np.ndarray) -> np.ndarray:
    """The (chunks, 2) uint64 (offset, nbytes) of a shard's inner chunks from the shard's last
    ``index_size`` bytes, checked against the index's CRC-32C (ValueError)."""
    import crc32c
    size = index_size(layout)
    if tail.size < size:
        raise ValueError(f"{tail.size} bytes, fewer than the shard index's {size}")
    index = tail[tail.size - size:]
    if crc32c.crc32c(index[:-4].tobytes()) != int.from_bytes(index[-4:].tobytes(), "little"):
        raise ValueError("the shard index does not match its CRC-32C")
    return index[:-4].view("<u8").reshape(-1, 2)


def _decode_chunk(layout: dict, i: int, src: np.ndarray, dest: np.ndarray) -> None:
    """Inner chunk ``i``'s stored bytes ``src`` into ``dest`` (its rows), Blosc's header checked first."""
    import numcodecs.blosc
    chunk_bytes = dest.nbytes
    nbytes = src.size
    if not layout["blosc"]:
        if nbytes != chunk_bytes:
            raise ValueError(f"inner chunk {i} holds {nbytes} bytes, not {chunk_bytes}")
        dest.reshape(-1).view(np.uint8)[:] = src
        return
    # Blosc's header: uncompressed size at bytes 4-8, compressed size at 12-16
    if nbytes < 16 or int(src[4:8].view("<u4")[0]) != chunk_bytes or int(src[12:16].view("<u4")[0]) != nbytes:
        raise ValueError(f"inner chunk {i}: its Blosc header does not describe a {chunk_bytes}-byte chunk")
    numcodecs.blosc.decompress(src, dest)


def decode(layout: dict, raw: np.ndarray, rows: int, empty=None, *, in_place: bool = False) -> np.ndarray:
    """The first ``rows`` rows of one Zarr shard's bytes ``raw`` (uint8), decoded into one array
    (``empty(shape, dtype)`` provides its memory). Bytes that do not fit the index raise
    ValueError: the index's CRC-32C, each inner chunk's place and size, and Blosc's own header are
    checked before anything is decompressed into the output. ``in_place``: when the rows are
    stored uncompressed and in order (codec ``none``, a shard written whole), a view of ``raw``
    itself, nothing copied: the caller owns ``raw`` and keeps it for as long as the rows live."""
    per_chunk, shard_shape, dtype = layout["per_chunk"], layout["shard_shape"], layout["dtype"]
    spans = read_index(layout, raw)
    chunks = -(-rows // per_chunk)
    shape = (chunks * per_chunk, *shard_shape[1:])
    data_end = raw.size - index_size(layout)
    if in_place and not layout["blosc"] and chunks:
        chunk_bytes = per_chunk * math.prod(shard_shape[1:]) * dtype.itemsize
        laid = np.arange(chunks, dtype=np.uint64) * np.uint64(chunk_bytes)
        if (spans[:chunks, 0] == laid).all() and (spans[:chunks, 1] == chunk_bytes).all() and \
                chunks * chunk_bytes <= data_end:
            return raw[:chunks * chunk_bytes].view(dtype).reshape(shape)[:rows]
    out = np.empty(shape, dtype=dtype) if empty is None else empty(shape, dtype)
    for i in range(chunks):
        offset, nbytes = (int(x) for x in spans[i])
        dest = out[i * per_chunk:(i + 1) * per_chunk]
        if offset == EMPTY and nbytes == EMPTY:
            dest[...] = layout["fill_value"]
            continue
        if offset + nbytes > data_end:
            raise ValueError(f"inner chunk {i} at bytes {offset}+{nbytes} lies beyond the shard's data ({data_end} bytes)")
        _decode_chunk(layout, i, raw[offset:offset + nbytes], dest)
    return out[:rows]


def decode_rows(layout: dict, spans: np.ndarray, read, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of one Zarr shard without fetching the rest of it: ``spans`` its index
    (``read_index``), ``read(start, end)`` a ranged read of the shard object. The inner chunks
    holding those rows are fetched in one read (from the first's start to the last's end: together
    in a shard written whole) and decoded as ``decode`` does (ValueError likewise).
    What a reader of a few rows of a large shard needs: a block's JPEG views in the byte heap."""
    per_chunk, shard_shape, dtype = layout["per_chunk"], layout["shard_shape"], layout["dtype"]
    if not 0 <= lo < hi <= int(shard_shape[0]):
        raise ValueError(f"rows {lo}:{hi} outside the shard's {shard_shape[0]}")
    first, last = lo // per_chunk, (hi - 1) // per_chunk
    out = np.empty(((last - first + 1) * per_chunk, *shard_shape[1:]), dtype=dtype)
    wanted = [(i, int(spans[i, 0]), int(spans[i, 1])) for i in range(first, last + 1)]
    stored = [(i, o, n) for i, o, n in wanted if not (o == EMPTY and n == EMPTY)]
    parts = {}
    if stored:  # one read from the first chunk's start to the last one's end (a shard written whole: no gaps)
        start, end = min(o for _, o, _ in stored), max(o + n for _, o, n in stored)
        got = read(start, end)
        if got is None or got.size != end - start:
            raise ValueError(f"inner chunks {stored[0][0]}-{stored[-1][0]} at bytes {start}-{end} lie beyond the shard")
        parts = {i: got[o - start:o - start + n] for i, o, n in stored}
    for i, _, _ in wanted:
        dest = out[(i - first) * per_chunk:(i - first + 1) * per_chunk]
        if i in parts:
            _decode_chunk(layout, i, parts[i], dest)
        else:
            dest[...] = layout["fill_value"]
    return out[lo - first * per_chunk:hi - first * per_chunk]
