"""The loader's block reads: the next block read ahead in a thread gives the same rows, a corrupt
block still fails at its own rows, and the thread ends with the shard."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from kdcache.errors import CorruptShardError
from kdcache.store import Store, StoreMeta, TeacherMeta, ViewPolicy
from kdcache.train.loader import BlockRows

ROWS, K, T, D = 2500, 2, 4, 8  # tiny rows: blocks of 1,024 (layout.MAX_BLOCK), so three blocks


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("blocks") / "s.zarr")
    t = TeacherMeta(model="m", weights_sha256="0" * 64, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                    interpolation="bicubic", crop_pct=0.9, patch_size=(16, 16), grid=(2, 2), dim=D, tokens=T,
                    prefix_tokens=1, summary="cls", dtype="float16", codec="lz4")
    store = Store.create(url, StoreMeta(view_policy=ViewPolicy(views=K), teachers={"t": t},
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
