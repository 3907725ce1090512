"""The loader's stages (``data.stream``): blocks read once each, whole and checked, in one thread ahead
of their samples; a corrupt block or a changed image stops the stream naming it, or is skipped and
counted; a resumed stream reads nothing before its position; the rows equal plain zarr."""
from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
import torch
from helpers import store_stream

from kdcache.data.partition import pick_view
from kdcache.data.stream import read_skips
from kdcache.data.walk import AlignError
from kdcache.errors import CorruptShardError
from kdcache.store import Store, StoreMeta, TeacherMeta, ViewPolicy
from kdcache.store.reads import BlockBuffers

ROWS, K, T, D = 2500, 2, 4, 8  # tiny rows: blocks of 1,024 (layout.MAX_BLOCK), so three blocks


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory):
    return _store(str(tmp_path_factory.mktemp("blocks") / "s.zarr"), 2)


def _store(url: str, fmt: int) -> str:
    """A K=2 store of ROWS rows in format ``fmt`` (2: a Zarr shard per (block, view); 1: per block)."""
    t = TeacherMeta(model="m", weights_sha256="0" * 64, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                    interpolation="bicubic", crop_pct=0.9, patch_size=(16, 16), grid=(2, 2), dim=D, tokens=T,
                    prefix_tokens=1, summary="cls", dtype="float16", codec="lz4")
    store = Store.create(url, StoreMeta(view_policy=ViewPolicy(views=K), teachers={"t": t}, format=fmt,
                                        corpus={"spec": "x", "fingerprint": "f"}, created_by="test"))
    rng = np.random.default_rng(0)
    w = store.new_shard("a", store.meta.teachers)
    w.append({"keys": np.asarray([f"k{i}" for i in range(ROWS)]), "views": rng.random((ROWS, K, 5)).astype(np.float32),
              "t/cls": rng.standard_normal((ROWS, K, D)).astype(np.float16),
              "t/patch": rng.standard_normal((ROWS, K, T, D)).astype(np.float16)})
    w.finish()
    return url


def _threads() -> int:
    return sum(t.name.startswith("kdcache-blocks") for t in threading.enumerate())


@pytest.mark.parametrize("fmt", [2, 1])
def test_any_span_of_rows_of_one_view_equals_plain_zarr_and_reads_that_view_alone(tmp_path, fmt):
    url = _store(str(tmp_path / f"f{fmt}.zarr"), fmt)
    store = Store.open(url)
    want = store.root["shards/a/t/patch"][:]
    if fmt == 2:  # view 0's objects gone: reading view 1 never touches them
        for b in range(3):
            os.remove(os.path.join(url, "shards", "a", "t", "patch", "c", str(b), "0", "0", "0"))
    store = Store.open(url)
    for start, stop in ((0, 1024), (1000, 1100), (1024, 2048), (0, ROWS), (2400, ROWS)):
        np.testing.assert_array_equal(store.read_span("a", "t/patch", start, stop, view=1), want[start:stop, 1])
    if fmt == 1:
        np.testing.assert_array_equal(store.read_span("a", "t/patch", 10, 20), want[10:20])


def test_blocks_decoded_into_reused_memory_never_change_a_row_still_held(rows_store):
    """A row still held (a sample not yet batched) keeps its block's memory from being handed out
    again; rows copied as they arrive let the same buffers serve every block."""
    store = Store.open(rows_store)
    patch = store.root["shards/a/t/patch"][:]
    pool = BlockBuffers(keep=2)
    held = [store.read_block("a", "t/patch", b, view=b % K, buffers=pool) for b in range(3)]
    assert len(pool._buffers) >= 3
    for b, rows in enumerate(held):
        np.testing.assert_array_equal(rows, patch[b * 1024:(b + 1) * 1024, b % K])
    del held, rows
    count = len(pool._buffers)
    for b in range(3):
        got = store.read_block("a", "t/patch", b, view=b % K, buffers=pool).copy()
        np.testing.assert_array_equal(got, patch[b * 1024:(b + 1) * 1024, b % K])
    assert len(pool._buffers) <= count  # nothing new allocated: freed buffers were handed out again


def test_every_block_is_read_once_whole_in_one_thread_ahead_of_its_samples(vit_store, corpus, monkeypatch):
    reads = []
    real = Store.read_span

    def recorded(self, shard, path, start, stop, **kw):
        reads.append((shard, path, start, stop, threading.current_thread().name))
        return real(self, shard, path, start, stop, **kw)

    monkeypatch.setattr(Store, "read_span", recorded)
    got = list(store_stream(vit_store, corpus, ("vit/cls", "vit/patch"), epoch=1))
    s = Store.open(vit_store)
    assert len(got) == 24 and sorted(x["key"] for x in got) == sorted(k for n in s.complete_shards()
                                                                      for k in s.keys(n).tolist())
    assert sorted((r[0], r[1]) for r in reads) == sorted((n, p) for n in s.complete_shards()
                                                         for p in ("vit/cls", "vit/patch"))  # once each
    assert {r[4] for r in reads} == {"kdcache-blocks_0"} and _threads() == 0  # one reader thread, ended with the epoch
    for x in got:  # the rows: the block's view this epoch, as plain zarr has them
        shard = next(n for n in s.complete_shards() if x["key"] in s.keys(n).tolist())
        row = s.keys(shard).tolist().index(x["key"])
        assert x["view"] == pick_view("epoch", K, shard=shard, block=0, epoch=1, seed=0)
        np.testing.assert_array_equal(x["vit/patch"].numpy(), s.root[f"shards/{shard}/vit/patch"][row, x["view"]])


def test_a_stream_stopped_midway_ends_its_thread(vit_store, corpus):
    it = iter(store_stream(vit_store, corpus, ("vit/cls",)))
    [next(it) for _ in range(3)]
    assert _threads() == 1
    it.close()
    assert _threads() == 0


def _corrupt(url: str, epoch: int = 0) -> str:
    """Flip a byte in the block of the second shard its samples read this epoch; return that shard."""
    store = Store.open(url)
    shard = store.complete_shards()[1]
    view = pick_view("epoch", store.meta.views, shard=shard, block=0, epoch=epoch, seed=0)
    obj = os.path.join(url, "shards", shard, "vit", "patch", "c", "0", str(view), "0", "0")
    data = bytearray(open(obj, "rb").read())
    data[100] ^= 0xFF
    open(obj, "wb").write(bytes(data))
    return shard


def test_a_corrupt_block_stops_the_stream_naming_it_or_is_skipped_with_its_samples_counted(vit_store, corpus, tmp_path):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(vit_store, url)
    bad = _corrupt(url)
    with pytest.raises(CorruptShardError, match=rf"shard {bad}: vit/patch: block 0 view \d does not match the checksum"):
        list(store_stream(url, corpus, ("vit/patch",)))
    assert _threads() == 0
    log = str(tmp_path / "skips.jsonl")
    keys = [x["key"] for x in store_stream(url, corpus, ("vit/patch",), skip_log=log)]
    assert len(keys) == 16 and not set(keys) & set(Store.open(url).keys(bad).tolist())
    assert [(r["shard"], r["block"], r["samples_skipped"]) for r in read_skips(log)] == [(bad, 0, 8)]


def test_a_changed_image_stops_the_stream_naming_shard_and_key_or_is_skipped(vit_store, corpus, tmp_path):
    """The store records each image's CRC-32: an image replaced by another (same name, same size) is
    caught where the name alone would pass."""
    import io
    import tarfile
    other = tmp_path / "corpus"
    shutil.copytree(corpus, other)
    path = other / "demo-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m for m, _ in members if m.name.endswith((".jpg", ".png")))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == victim.name:
                data = bytes(reversed(data))  # the same size, other bytes
            tar.addfile(m, io.BytesIO(data))
    key = victim.name.rsplit(".", 1)[0]
    with pytest.raises(AlignError, match=rf"shard demo-000001: sample '{key}': its image bytes are not those extracted"):
        list(store_stream(vit_store, str(other), ("vit/cls",)))
    log = str(tmp_path / "skips.jsonl")
    keys = [x["key"] for x in store_stream(vit_store, str(other), ("vit/cls",), skip_log=log)]
    assert len(keys) == 23 and key not in keys
    assert [(r["shard"], r["key"], r["samples_skipped"]) for r in read_skips(log)] == [("demo-000001", key, 1)]


def test_a_resumed_stream_reads_nothing_before_its_position(vit_store, corpus, monkeypatch):
    """Positions 0-13 of the epoch were delivered: the resumed stream delivers exactly the other ten,
    reading only the blocks that hold them and decoding no other image."""
    full = list(store_stream(vit_store, corpus, ("vit/cls",), epoch=2))
    decoded, reads = [], []
    import kdcache.data.stream as stream_module
    real_view_pixels, real_span = stream_module.view_pixels, Store.read_span

    def counting(samples, **kw):
        samples = list(samples)
        decoded.extend(s.key for s in samples)
        return real_view_pixels(samples, **kw)

    def span(self, shard, path, start, stop, **kw):
        reads.append(shard)
        return real_span(self, shard, path, start, stop, **kw)

    monkeypatch.setattr(stream_module, "view_pixels", counting)
    monkeypatch.setattr(Store, "read_span", span)
    stream = store_stream(vit_store, corpus, ("vit/cls",), epoch=2)
    stream.resume_at(2, [(14, 24)])
    rest = list(stream)
    assert [x["key"] for x in rest] == [x["key"] for x in full[14:]] and sorted(decoded) == sorted(x["key"] for x in rest)
    order = stream.spec.order(2)
    holding = {stream.spec.shards[order[p].shard].name for p in range(14, 24)}
    assert set(reads) == holding and len(reads) == len(holding)
    for a, b in zip(rest, full[14:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["vit/cls"], b["vit/cls"])


def test_a_store_written_before_origin_reads_its_images_through_the_walk(vit_store, corpus, tmp_path):
    """A format-2 store has no ``origin``: the places of its images come from the corpus's own walk
    (a local tar's headers only), and the samples are the same."""
    import zarr
    url = str(tmp_path / "old.zarr")
    shutil.copytree(vit_store, url)
    for name in Store.open(url).complete_shards():
        g = zarr.open_group(url, mode="r+")[f"shards/{name}"]
        attrs = g.attrs.asdict()
        attrs["digest"].pop("origin")
        attrs["block_crc32"].pop("origin", None)
        attrs.pop("block"), attrs.pop("binding")  # as format 2 wrote it
        g.attrs.put(attrs)
        del g["origin"]
    root = zarr.open_group(url, mode="r+")
    root.attrs.put({**root.attrs.asdict(), "kdcache": {**root.attrs["kdcache"], "format": 2}})
    os.remove(os.path.join(url, "shard_index.json"))
    assert Store.open(url).origin(Store.open(url).complete_shards()[0]) is None
    old, new = (list(store_stream(u, corpus, ("vit/cls",), epoch=1)) for u in (url, vit_store))
    assert [x["key"] for x in old] == [x["key"] for x in new] and len(old) == 24
    assert all(torch.equal(a["image"], b["image"]) and a["label"] == b["label"] for a, b in zip(old, new))


def test_a_stream_iterated_in_process_then_forked_into_a_worker_starts_its_own_thread(vit_store, corpus):
    from torch.utils.data import DataLoader
    stream = store_stream(vit_store, corpus, ("vit/cls",), workers=1)
    assert len(list(stream)) == 24
    stream.set_epoch(1)
    got = [s["key"] for s in DataLoader(stream, batch_size=None, num_workers=1, timeout=60)]
    fresh = store_stream(vit_store, corpus, ("vit/cls",), workers=1, epoch=1)
    assert got == [s["key"] for s in fresh] and len(got) == 24


def test_the_online_path_takes_the_cached_paths_split(vit_store, corpus):
    """The same shards, counts and seed: an online stream (fresh views, live teachers' crops, the
    images' places from its count pass) and the cached stream deliver the same keys to each rank."""
    import dataclasses

    from kdcache.data.corpus import DecodeOptions, resolve_corpus
    from kdcache.data.stream import SampleStream
    from kdcache.train.online import count_samples
    cached = {r: store_stream(vit_store, corpus, ("vit/cls",), rank=r, world=2, epoch=3, batch_size=4) for r in (0, 1)}
    c = resolve_corpus(corpus)
    places, skipped = count_samples(c, DecodeOptions(), progress=False)
    assert not skipped and {n: len(p) for n, p in places.items()} == {s.name: s.count for s in cached[0].spec.shards}
    for rank in (0, 1):
        spec = dataclasses.replace(cached[rank].spec, views="fresh", store_url=None, target_paths=())
        online = SampleStream(spec, c, rank=rank, world=2, places=places, epoch=3)
        got = [x["key"] for x in online]
        assert got == [x["key"] for x in cached[rank]] and len(got) == 12
        assert {x["view"] for x in SampleStream(spec, c, rank=rank, world=2, places=places, epoch=3)} == {4}  # epoch + 1
