"""The loader's block reads: the next block read ahead in a thread gives the same rows, a corrupt
block still fails at its own rows, and the thread ends with the shard; the next shard opened ahead
while one streams, with the same guarantees."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.errors import CorruptShardError
from kdcache.store import Store, StoreMeta, TeacherMeta, ViewPolicy
from kdcache.store.reads import BlockBuffers
from kdcache.train.loader import BlockRows, CachedStream, LoaderError, LoaderSpec, pick_view, read_skips

ROWS, K, T, D = 2500, 2, 4, 8  # tiny rows: blocks of 1,024 (layout.MAX_BLOCK), so three blocks


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
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


def _rows(url, prefetch: bool, rows=range(ROWS)):
    store = Store.open(url)
    blocks = BlockRows(store, "a", ("t/cls", "t/patch"), store.shard_attrs("a"), prefetch=prefetch)
    try:
        return [{p: t.numpy().copy() for p, t in blocks.row(r, r % K).items()} for r in rows]
    finally:
        blocks.close()


def _threads() -> int:
    return sum(t.name.startswith("kdcache-blocks") for t in threading.enumerate())


def test_reading_ahead_gives_the_rows_plain_zarr_reads(store_url):
    assert Store.open(store_url).block_rows("a", "t/patch") == 1024
    ahead, plain = _rows(store_url, True), _rows(store_url, False)
    patch = Store.open(store_url).root["shards/a/t/patch"][:]
    for r in (0, 1023, 1024, 2047, 2048, ROWS - 1):
        np.testing.assert_array_equal(ahead[r]["t/patch"], patch[r, r % K])
        np.testing.assert_array_equal(ahead[r]["t/cls"], plain[r]["t/cls"])
    assert _threads() == 0  # closed with the shard
    few = _rows(store_url, True, rows=[0, 1, 2, ROWS - 1])  # a skipped block: read when asked, the read-ahead dropped
    np.testing.assert_array_equal(few[-1]["t/patch"], patch[ROWS - 1, (ROWS - 1) % K])


def test_one_view_of_a_block_is_read_alone_and_a_format_1_store_still_reads(tmp_path):
    """Format 2: the view a block is read for is its own Zarr shard, read alone (the other view's
    objects deleted, every row still arrives, equal to plain zarr). Format 1 (a block holds every
    view): the same rows, the whole block read."""
    import shutil
    for fmt in (2, 1):
        url = _store(str(tmp_path / f"f{fmt}.zarr"), fmt)
        patch = Store.open(url).root["shards/a/t/patch"]
        assert patch.shards[1] == (1 if fmt == 2 else K) and Store.open(url).meta.format == fmt
        if fmt == 2:
            for path in ("cls", "patch"):
                for b in range(3):
                    os.remove(os.path.join(url, "shards", "a", "t", path, "c", str(b), "0", *["0"] * (path == "patch"), "0"))
        want = patch[:]
        store = Store.open(url)
        blocks = BlockRows(store, "a", ("t/cls", "t/patch"), store.shard_attrs("a"), view_of=lambda block: 1)
        try:
            got = np.stack([blocks.row(r, 1)["t/patch"].numpy() for r in range(ROWS)])
            np.testing.assert_array_equal(got, want[:, 1])
            with pytest.raises(LoaderError, match="asked for view 0, but its block was read for view 1"):
                blocks.row(ROWS - 1, 0)
        finally:
            blocks.close()
        shutil.rmtree(url)


def test_a_corrupt_block_read_ahead_fails_at_its_own_rows(store_url, tmp_path):
    import shutil
    url = str(tmp_path / "c.zarr")
    shutil.copytree(store_url, url)
    obj = os.path.join(url, "shards", "a", "t", "patch", "c", "1", "0", "0", "0")
    data = bytearray(open(obj, "rb").read())
    data[100] ^= 0xFF  # inside block 1's first inner chunk
    open(obj, "wb").write(bytes(data))
    store = Store.open(url)
    blocks = BlockRows(store, "a", ("t/patch",), store.shard_attrs("a"))
    try:
        for r in range(1024):  # block 0 is delivered whole while block 1 is read (and found corrupt) ahead
            blocks.row(r, 0)
        with pytest.raises(CorruptShardError, match=r"shard a: t/patch: block 1"):
            blocks.row(1024, 0)
    finally:
        blocks.close()
    assert _threads() == 0


class _Recorded(CachedStream):
    """The loader, its shard openings and shard ends recorded in order."""

    def __init__(self, *a, read_ahead=True, **kw):
        super().__init__(*a, **kw)
        self.events, self.read_ahead = [], read_ahead

    def _open(self, name, epoch):
        self.events.append(("open", name))
        return super()._open(name, epoch)

    def _read_ahead(self, name, epoch):
        if self.read_ahead:
            super()._read_ahead(name, epoch)

    def _shard(self, name, epoch):
        yield from super()._shard(name, epoch)
        if self._ahead is not None:  # the opening started while this shard streamed (its thread may not have run yet)
            self._ahead[1].exception()
        self.events.append(("end", name))


def _recorded(store_url, corpus, **kw):
    s = Store.open(store_url)
    spec = LoaderSpec(store_url=store_url, shards=tuple(s.complete_shards()), target_paths=("vit/cls", "vit/patch"),
                      input_size=(32, 32), interpolation="bicubic", shuffle_buffer=4, seed=0,
                      decode=ReadOptions.from_dict(s.meta.corpus).decode, skip_log=kw.pop("skip_log", None))
    return _Recorded(resolve_corpus(corpus), spec, **kw)


def _open_threads() -> int:
    return sum(t.name.startswith(("kdcache-open", "kdcache-blocks")) for t in threading.enumerate())


def test_the_next_shard_is_opened_while_this_one_streams_and_gives_the_same_samples(vit_store, corpus):
    ahead = _recorded(vit_store, corpus)
    got = list(ahead)
    plain = list(_recorded(vit_store, corpus, read_ahead=False))
    assert [s["key"] for s in got] == [s["key"] for s in plain] and len(got) == 24
    for a, b in zip(got, plain):
        for k in ("image", "vit/cls", "vit/patch"):
            assert torch.equal(a[k], b[k])
    order = [name for what, name in ahead.events if what == "end"]  # this epoch's shard order
    assert sorted(order) == Store.open(vit_store).complete_shards()
    for this, following in zip(order, order[1:]):  # opened before the shard ahead of it ended
        assert ahead.events.index(("open", following)) < ahead.events.index(("end", this)), ahead.events
    assert [name for what, name in ahead.events if what == "open"] == order  # each once, in order
    assert _open_threads() == 0


def test_a_run_stopped_mid_shard_closes_the_shard_read_ahead(vit_store, corpus):
    stream = _recorded(vit_store, corpus)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    assert len(first) == 3 and len([e for e in stream.events if e[0] == "open"]) == 2  # the next one too
    it.close()
    assert _open_threads() == 0 and stream._ahead is None


def test_a_corrupt_shard_read_ahead_fails_at_its_own_turn(vit_store, corpus, tmp_path):
    import shutil
    url = str(tmp_path / "c.zarr")
    shutil.copytree(vit_store, url)
    shards = Store.open(url).complete_shards()
    view = pick_view("epoch", Store.open(url).meta.views, shard=shards[1], block=0, epoch=0, seed=0)  # the one read
    obj = os.path.join(url, "shards", shards[1], "vit", "patch", "c", "0", str(view), "0", "0")
    data = bytearray(open(obj, "rb").read())
    data[100] ^= 0xFF
    open(obj, "wb").write(bytes(data))
    stream = _recorded(url, corpus, skip_log=str(tmp_path / "skips.jsonl"))
    keys = [s["key"] for s in stream]
    assert len(keys) == 16 and not set(keys) & set(Store.open(url).keys(shards[1]).tolist())
    assert [(r["shard"], r["samples_skipped"]) for r in read_skips(str(tmp_path / "skips.jsonl"))] == [(shards[1], 8)]
    stream = _recorded(url, corpus)
    delivered = []
    with pytest.raises(CorruptShardError, match=rf"shard {shards[1]}: vit/patch: block 0"):
        for sample in stream:
            delivered.append(sample["key"])
    before = [name for what, name in stream.events if what == "end"]  # the shards streamed before the error
    assert shards[1] not in before and len(delivered) == 8 * len(before) - 4  # all but the shuffle buffer's 4
    assert _open_threads() == 0


def test_a_shard_opened_ahead_that_fails_unexpectedly_does_not_hide_the_run_stopping(vit_store, corpus):
    class Failing(_Recorded):
        def _open(self, name, epoch):
            if self.events:  # every shard after the first: an error the store does not know (not a StoreError)
                raise OSError(f"disk gone while opening {name}")
            return super()._open(name, epoch)
    s = Store.open(vit_store)
    spec = LoaderSpec(store_url=vit_store, shards=tuple(s.complete_shards()), target_paths=("vit/cls",),
                      input_size=(32, 32), interpolation="bicubic", shuffle_buffer=4, seed=0,
                      decode=ReadOptions.from_dict(s.meta.corpus).decode)
    stream = Failing(resolve_corpus(corpus), spec)
    it = iter(stream)
    next(it)  # the first shard streams; the second was opened ahead, and failed
    it.close()  # the run stops before reaching it: closing neither raises nor leaves a thread
    assert _open_threads() == 0
    with pytest.raises(OSError, match="disk gone while opening"):  # reached, its own error surfaces
        list(Failing(resolve_corpus(corpus), spec))
    assert _open_threads() == 0


def _keys_and_targets(samples):
    return [s["key"] for s in samples], [(s["image"], s["vit/cls"], s["vit/patch"]) for s in samples]


def _same_samples(a, b):
    ka, ta = _keys_and_targets(a)
    kb, tb = _keys_and_targets(b)
    assert ka == kb
    assert all(torch.equal(x, y) for u, v in zip(ta, tb) for x, y in zip(u, v))


def test_the_next_epochs_first_shard_is_opened_as_this_epoch_ends(vit_store, corpus):
    from kdcache.data.partition import epoch_streams
    shards = Store.open(vit_store).complete_shards()
    first_of_1 = epoch_streams(shards, seed=0, epoch=1, world=1, workers=1)[0][0][0]
    stream = _recorded(vit_store, corpus)
    stream.set_epoch(0, following=1)
    list(stream)
    ends = [i for i, e in enumerate(stream.events) if e[0] == "end"]
    opened_ahead = len(stream.events) - 1 - stream.events[::-1].index(("open", first_of_1))
    assert len(ends) == 3 and ends[-2] < opened_ahead < ends[-1]  # while epoch 0's last shard streamed
    assert stream._ahead[0] == (first_of_1, 1) and _open_threads() > 0  # kept open between the epochs
    before = len(stream.events)
    stream.set_epoch(1)  # the last epoch: nothing follows
    got = list(stream)
    opens = [name for what, name in stream.events[before:] if what == "open"]
    assert len(opens) == 2 and first_of_1 not in opens  # epoch 1's first shard was not opened again
    assert _open_threads() == 0 and stream._ahead is None
    plain = _recorded(vit_store, corpus, read_ahead=False)
    plain.set_epoch(1)
    _same_samples(got, list(plain))


def test_a_shard_opened_for_an_epoch_that_does_not_come_is_dropped(vit_store, corpus):
    stream = _recorded(vit_store, corpus)
    stream.set_epoch(0, following=1)
    list(stream)
    stream.set_epoch(5)  # not the epoch announced: its shards are opened as usual, the one opened ahead closed
    got = list(stream)
    plain = _recorded(vit_store, corpus, read_ahead=False)
    plain.set_epoch(5)
    _same_samples(got, list(plain))
    assert _open_threads() == 0 and stream._ahead is None


def test_every_shard_of_a_stream_is_read_in_one_thread_that_ends_with_the_stream(vit_store, corpus, monkeypatch):
    readers = []
    real = BlockRows._read

    def recorded(self, index):
        readers.append((self.shard, threading.current_thread()))
        return real(self, index)

    monkeypatch.setattr(BlockRows, "_read", recorded)
    stream = _recorded(vit_store, corpus)
    got = list(stream)
    shards = {name for name, _ in readers}
    assert len(got) == 24 and shards == set(Store.open(vit_store).complete_shards()) and len(shards) > 1
    threads = {t for _, t in readers}
    assert len(threads) == 1 and next(iter(threads)).name.startswith("kdcache-blocks")  # not one thread per shard
    assert threading.main_thread() not in threads and _open_threads() == 0  # ended with the epoch


def test_a_stream_iterated_in_process_then_forked_into_a_worker_starts_its_own_threads(vit_store, corpus):
    from torch.utils.data import DataLoader
    stream = _recorded(vit_store, corpus)
    stream.set_epoch(0, following=1)
    assert len(list(stream)) == 24  # in process: its threads live on, the next epoch's first shard opened ahead
    assert stream._ahead is not None and _open_threads() > 0
    stream.set_epoch(1)
    try:  # the worker inherits the thread pools and the shard opened ahead, not their threads
        got = [s["key"] for s in DataLoader(stream, batch_size=None, num_workers=1, timeout=60)]
    finally:
        stream.close()
    fresh = _recorded(vit_store, corpus)
    fresh.set_epoch(1)
    assert got == [s["key"] for s in fresh] and len(got) == 24


def test_blocks_decoded_into_reused_memory_never_change_a_row_still_held(store_url):
    """The loader decodes blocks into memory it reuses (``BlockBuffers``): a row a sample still
    holds (in the shuffle buffer, not yet collated) keeps its block's memory from being handed out
    again, and rows copied as soon as they arrive let two or three buffers per array serve a shard."""
    store = Store.open(store_url)
    cls, patch = store.root["shards/a/t/cls"][:], store.root["shards/a/t/patch"][:]
    pool = BlockBuffers(keep=2)

    def rows(keep: bool):
        blocks = BlockRows(store, "a", ("t/cls", "t/patch"), store.shard_attrs("a"), buffers=pool, view_of=lambda b: b % K)
        try:
            return [(r, out if keep else {p: t.clone() for p, t in out.items()})
                    for r in range(ROWS) for out in [blocks.row(r, (r // 1024) % K)]]
        finally:
            blocks.close()
    held = rows(keep=True)  # every row's tensor kept: all three blocks of both arrays stay alive
    assert len(pool._buffers) >= 6
    for r, out in held:
        np.testing.assert_array_equal(out["t/cls"].numpy(), cls[r, (r // 1024) % K])
        np.testing.assert_array_equal(out["t/patch"].numpy(), patch[r, (r // 1024) % K])
    del held, out
    count = len(pool._buffers)
    copied = rows(keep=False)
    assert len(pool._buffers) <= count  # nothing new allocated: freed buffers were handed out again
    for r, out in copied[::97]:
        np.testing.assert_array_equal(out["t/patch"].numpy(), patch[r, (r // 1024) % K])
