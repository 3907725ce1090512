"""Block reads decode Zarr shards from the published format (``store.zarr_shards``), fetched whole
(``store.objects``): the same rows zarr's own ``Array`` reads, for every layout and codec kdcache
writes, on a local path and through fsspec; a one-line error for bytes that do not fit."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import zarr
import zarr.codecs

from kdcache.store import zarr_shards
from kdcache.store.layout import compressors
from kdcache.store.objects import Objects
from kdcache.store.checks import crc32
from kdcache.store.reads import BlockBuffers, block_in_one_request

BLOCK, CHUNK, ROWS = 8, 4, 13  # a full block, then a partial one ending inside an inner chunk


def _url(tmp_path, codec):
    return str(tmp_path / f"{codec}.zarr")


def _array(tmp_path, codec: str, dtype=np.float16, url=None, **over):
    root = zarr.open_group(url or _url(tmp_path, codec), mode="w")
    kw = dict(shape=(ROWS, 2, 5), dtype=dtype, chunks=(CHUNK, 2, 5), shards=(BLOCK, 2, 5), compressors=compressors(codec))
    a = root.create_array("x", **{**kw, **over})
    rows = np.random.default_rng(0).standard_normal((ROWS, 2, 5)).astype(dtype)
    a[:] = rows
    return a, rows


def _read(url, a, index, view=0, buffers=None):
    """A block as a store reads it: the group's objects, keys relative to it."""
    return block_in_one_request(Objects(url), a, index, BLOCK, view, buffers)


def _decode(a, data, rows):
    layout = zarr_shards.shard_layout(a.metadata.to_dict())
    return None if layout is None else zarr_shards.decode(layout, np.frombuffer(bytes(data), np.uint8), rows)


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
def test_blocks_decode_to_what_zarr_reads(tmp_path, codec, dtype):
    a, rows = _array(tmp_path, codec, dtype)
    for index in (0, 1):
        got = _read(_url(tmp_path, codec), a, index)
        want = np.asarray(zarr.open_array(str(tmp_path / f"{codec}.zarr" / "x"), mode="r")[index * BLOCK:(index + 1) * BLOCK])
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, rows[index * BLOCK:(index + 1) * BLOCK])
    data = open(_shard_file(tmp_path, codec, 1), "rb").read()
    direct = _decode(a, data, ROWS - BLOCK)  # decoded here, not left to zarr
    assert direct is not None
    np.testing.assert_array_equal(direct, rows[BLOCK:])


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_a_view_of_a_per_view_array_decodes_alone_to_what_zarr_reads(tmp_path, codec):
    """Format 2: each view of a block is a Zarr shard of its own, decoded directly (not by zarr)."""
    a, rows = _array(tmp_path, codec, chunks=(CHUNK, 1, 5), shards=(BLOCK, 1, 5))
    for index in (0, 1):
        for view in (0, 1):
            got = _read(_url(tmp_path, codec), a, index, view)
            assert got.shape == (min(BLOCK, ROWS - index * BLOCK), 1, 5)
            np.testing.assert_array_equal(got[:, 0], rows[index * BLOCK:(index + 1) * BLOCK, view])
    data = open(os.path.join(tmp_path, f"{codec}.zarr", "x", "c", "1", "1", "0"), "rb").read()
    direct = _decode(a, data, ROWS - BLOCK)
    assert direct is not None
    np.testing.assert_array_equal(direct[:, 0], rows[BLOCK:, 1])


def _shard_file(tmp_path, codec, index):
    return os.path.join(tmp_path, f"{codec}.zarr", "x", "c", str(index), "0", "0")


def test_a_missing_inner_chunk_reads_as_the_fill_value(tmp_path):
    a, rows = _array(tmp_path, "lz4")
    a[4:8] = 0  # zarr drops a chunk equal to the fill value: its index entry says "never written"
    got = _read(_url(tmp_path, "lz4"), a, 0)
    np.testing.assert_array_equal(got[4:8], np.zeros((4, 2, 5), np.float16))
    np.testing.assert_array_equal(got[:4], rows[:4])


@pytest.mark.parametrize("where,match", [("index", "CRC-32C"), ("short", "fewer than the shard index"),
                                         ("offset", "CRC-32C"), ("header", "Blosc header")])
def test_bytes_that_do_not_fit_the_index_are_a_value_error(tmp_path, where, match):
    a, _ = _array(tmp_path, "lz4")
    path = _shard_file(tmp_path, "lz4", 0)
    data = bytearray(open(path, "rb").read())
    if where == "index":
        data[-10] ^= 0xFF
    elif where == "short":
        data = data[:20]
    elif where == "offset":
        data[-4 - 2 * 16] ^= 0x40  # the first inner chunk's offset, without fixing the index checksum
    else:
        data[4] ^= 0x01  # the first chunk's Blosc header: its uncompressed size
    with pytest.raises(ValueError, match=match):
        _decode(a, data, BLOCK)


def test_a_layout_kdcache_does_not_write_is_left_to_zarr(tmp_path):
    a, rows = _array(tmp_path, "none", serializer=zarr.codecs.BytesCodec(endian="big"))
    assert zarr_shards.shard_layout(a.metadata.to_dict()) is None
    np.testing.assert_array_equal(_read(_url(tmp_path, "none"), a, 0), rows[:BLOCK])
    # through fsspec (object storage's path) too
    url = f"memory://{tmp_path.name}/big.zarr"
    m, _ = _array(tmp_path, "none", url=url, serializer=zarr.codecs.BytesCodec(endian="big"))
    for index in (0, 1):
        np.testing.assert_array_equal(_read(url, m, index), rows[index * BLOCK:(index + 1) * BLOCK])


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_blocks_read_through_fsspec_decode_to_what_zarr_reads(tmp_path, codec):
    """The object-storage path (fsspec, one ranged GET per block): kdcache's decode, not zarr's."""
    url = f"memory://{tmp_path.name}/{codec}.zarr"
    a, rows = _array(tmp_path, codec, url=url, chunks=(CHUNK, 1, 5), shards=(BLOCK, 1, 5))
    assert zarr_shards.shard_layout(a.metadata.to_dict()) is not None
    for index in (0, 1):
        for view in (0, 1):
            np.testing.assert_array_equal(_read(url, a, index, view)[:, 0], rows[index * BLOCK:(index + 1) * BLOCK, view])
    assert Objects(url).get("x/c/7/0/0", limit=1 << 20) is None  # a missing object, as zarr says


def test_chunk_keys_follow_the_arrays_key_encoding():
    assert zarr_shards.chunk_key({"chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}}}, (3, 1, 0)) == "c/3/1/0"
    assert zarr_shards.chunk_key({"chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}}}, (3, 1)) == "c.3.1"
    assert zarr_shards.chunk_key({"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}}, (3, 1)) == "3.1"
    assert zarr_shards.chunk_key({}, (2,)) == "c/2"
    with pytest.raises(ValueError, match="chunk key encoding 'odd'"):
        zarr_shards.chunk_key({"chunk_key_encoding": {"name": "odd"}}, (1,))


def test_the_decoded_key_is_the_one_zarr_writes(tmp_path):
    """A dot-separated key encoding: the object kdcache fetches is the one zarr wrote (else every
    block would read as missing and fail its checksum)."""
    a, rows = _array(tmp_path, "lz4", chunk_key_encoding={"name": "default", "separator": "."})
    assert os.path.exists(os.path.join(_url(tmp_path, "lz4"), "x", "c.1.0.0"))
    np.testing.assert_array_equal(_read(_url(tmp_path, "lz4"), a, 1), rows[BLOCK:])


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_the_block_checksum_is_zlibs_crc32_of_the_c_order_bytes(dtype):
    """Stores record zlib's CRC-32 (computed by ISA-L): the value any reader can recompute."""
    rows = np.random.default_rng(1).standard_normal((7, 3, 33)).astype(dtype)
    assert crc32(rows) == zlib.crc32(rows.tobytes())
    assert crc32(rows[:, 1]) == zlib.crc32(np.ascontiguousarray(rows[:, 1]).tobytes())  # a strided view: its C-order bytes
    assert crc32(rows[:0]) == zlib.crc32(b"") == 0


def test_a_local_object_is_read_into_the_threads_reused_buffer(tmp_path):
    a, rows = _array(tmp_path, "lz4")
    objects = Objects(_url(tmp_path, "lz4"))
    first = objects.get("x/c/0/0/0", limit=1 << 20, reuse=True)
    assert first.tobytes() == open(_shard_file(tmp_path, "lz4", 0), "rb").read()
    second = objects.get("x/c/1/0/0", limit=1 << 20, reuse=True)
    assert second.tobytes() == open(_shard_file(tmp_path, "lz4", 1), "rb").read()
    assert np.shares_memory(first, second)  # one buffer per thread: valid until the thread's next read
    assert objects.get("x/c/9/0/0", limit=1 << 20) is None  # missing, as zarr says
    # decoded blocks are new arrays, never views of that buffer: both blocks intact after both reads
    got = [_read(_url(tmp_path, "lz4"), a, i) for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(got), rows)


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_an_object_larger_than_its_limit_is_refused_before_it_is_read(tmp_path, monkeypatch, where):
    from kdcache.store import reads
    url = _url(tmp_path, "none") if where == "local" else f"memory://{tmp_path.name}/limit.zarr"
    a, _ = _array(tmp_path, "none", url=url)
    with pytest.raises(ValueError, match="more than"):
        Objects(url).get("x/c/0/0/0", limit=16)
    monkeypatch.setattr(reads, "MAX_BLOCK_BYTES", 16 - (1 << 24))  # a bound below this object (a tampered one: above 2 GiB)
    with pytest.raises(ValueError, match="more than"):
        _read(url, a, 0)


@pytest.mark.parametrize("codec", ["lz4", "none"])  # decoded into a buffer; used in the buffer it was read into
def test_blocks_decoded_into_reused_buffers_keep_their_rows_while_any_is_alive(tmp_path, codec):
    a, rows = _array(tmp_path, codec)
    pool = BlockBuffers(keep=1)
    held = _read(_url(tmp_path, codec), a, 0, buffers=pool)[3]  # one row of block 0 kept, as a sample keeps it
    second = _read(_url(tmp_path, codec), a, 1, buffers=pool)
    assert len(pool._buffers) == 2 and not np.shares_memory(held, second)  # block 0's buffer was not handed out again
    assert all(any(np.shares_memory(r, b) for b in pool._buffers) for r in (held, second))
    np.testing.assert_array_equal(held, rows[3])
    np.testing.assert_array_equal(second, rows[BLOCK:])
    before = {b.__array_interface__["data"][0] for b in pool._buffers}
    del held, second
    again = _read(_url(tmp_path, codec), a, 1, buffers=pool)  # nothing refers to either buffer now: one is reused
    assert len(pool._buffers) == 2 and again.__array_interface__["data"][0] in before
    np.testing.assert_array_equal(again, rows[BLOCK:])


def test_uncompressed_rows_are_a_view_of_the_bytes_read_only_when_laid_out_in_order(tmp_path):
    a, rows = _array(tmp_path, "none")
    data = np.frombuffer(bytearray(open(_shard_file(tmp_path, "none", 0), "rb").read()), np.uint8)
    layout = zarr_shards.shard_layout(a.metadata.to_dict())
    got = zarr_shards.decode(layout, data, BLOCK, in_place=True)
    assert np.shares_memory(got, data)  # nothing copied
    np.testing.assert_array_equal(got, rows[:BLOCK])
    a[4:8] = 0  # an inner chunk equal to the fill value is not written: the rows are no longer one run
    data = np.frombuffer(bytearray(open(_shard_file(tmp_path, "none", 0), "rb").read()), np.uint8)
    got = zarr_shards.decode(layout, data, BLOCK, in_place=True)
    assert not np.shares_memory(got, data)
    np.testing.assert_array_equal(got, np.concatenate([rows[:4], np.zeros((4, 2, 5), np.float16)]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, "bfloat16-bits"])
def test_the_finiteness_check_agrees_with_numpy_in_every_slice(dtype):
    """``all_finite`` tests the bits slice by slice: a non-finite value anywhere (first, last,
    across a slice boundary) is found, and the largest finite values pass; against np.isfinite."""
    from kdcache.store.checks import FINITE_SLICE, all_finite
    n = 2 * FINITE_SLICE + 7  # three slices, the last a short one
    rng = np.random.default_rng(0)
    if dtype == "bfloat16-bits":  # bf16 as its stored uint16 bits: the top half of a float32
        values = rng.standard_normal(n).astype(np.float32)
        values[:3] = (3.38e38, -3.38e38, 1e-40)  # near bf16's largest finite magnitude, and a subnormal
        as_bits = lambda v: (v.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
        rows, finite = as_bits(values), lambda r: np.isfinite((r.astype(np.uint32) << 16).view(np.float32)).all()
    else:
        rows = rng.standard_normal(n).astype(dtype)
        rows[:2] = (np.finfo(dtype).max, np.finfo(dtype).min)
        as_bits, finite = None, lambda r: np.isfinite(r).all()
    assert all_finite(rows) and finite(rows)
    for at in (0, FINITE_SLICE - 1, FINITE_SLICE, n - 1):
        for bad in (np.nan, np.inf, -np.inf):
            damaged = rows.copy()
            damaged[at] = as_bits(np.array([bad], np.float32))[0] if as_bits else bad
            assert not finite(damaged) and not all_finite(damaged), (at, bad)


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_rows_of_a_shard_read_by_range_are_what_zarr_reads(tmp_path, where):
    """``decode_rows``: a JPEG heap's few bytes without its whole Zarr shard (the index by a suffix
    read, the inner chunks holding them in one ranged read), any range, across inner chunks and
    shards; a tampered index or a chunk beyond the object is a ValueError."""
    url = str(tmp_path / "heap.zarr") if where == "local" else f"memory://{tmp_path.name}/heap.zarr"
    root = zarr.open_group(url, mode="w")
    heap = root.create_array("h", shape=(5000,), dtype="uint8", chunks=(256,), shards=(2048,),
                             compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"))
    data = np.random.default_rng(1).integers(0, 256, 5000).astype(np.uint8)
    heap[:] = data
    objects = Objects(url)
    meta = heap.metadata.to_dict()
    layout = zarr_shards.shard_layout(meta)
    rng = np.random.default_rng(2)
    for lo, hi in [(0, 1), (0, 2048), (255, 257), (1000, 2048), *(sorted(rng.integers(0, 2048, 2)) for _ in range(20))]:
        if lo == hi:
            continue
        for k in range(3):
            key = f"h/{zarr_shards.chunk_key(meta, (k,))}"
            spans = zarr_shards.read_index(layout, objects.get_range(key, -zarr_shards.index_size(layout)))
            stop = min(hi, 5000 - k * 2048)
            if lo >= stop:
                continue
            got = zarr_shards.decode_rows(layout, spans, lambda s, e, key=key: objects.get_range(key, s, e), lo, stop)
            np.testing.assert_array_equal(got, data[k * 2048 + lo:k * 2048 + stop])
    key = f"h/{zarr_shards.chunk_key(meta, (0,))}"
    tail = objects.get_range(key, -zarr_shards.index_size(layout)).copy()
    tail[0] ^= 1
    with pytest.raises(ValueError, match="does not match its CRC-32C"):
        zarr_shards.read_index(layout, tail)
    spans = zarr_shards.read_index(layout, objects.get_range(key, -zarr_shards.index_size(layout))).copy()
    spans[0, 0] += 10 ** 9
    with pytest.raises(ValueError, match="beyond the shard"):
        zarr_shards.decode_rows(layout, spans, lambda s, e: objects.get_range(key, s, e), 0, 10)
