"""The bugs of three drifted walks, end to end: extraction, verify --data and training agree on
which samples exist (duplicate keys, '..' keys, bad images, folder shard sizes)."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import verify_store
from kdcache.data.demo_corpus import write_tar
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.train.config import TrainConfig
from kdcache.train.fit import train

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


def _img(seed, size=40):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tricky_corpus(tmp_path_factory):
    """Two shards: a duplicate key (non-adjacent), a '..' member, a corrupt image, a '../x' key."""
    d = tmp_path_factory.mktemp("tricky")
    samples = [(f"k{i}", _img(i), i % 3, "png") for i in range(8)]
    write_tar(str(d / "t-000000.tar"), samples[:4] + [("k1", _img(99), 1, "png")] + [("bad", b"not an image", 0, "jpg")])
    write_tar(str(d / "t-000001.tar"), samples[4:])
    with tarfile.open(d / "t-000001.tar", "a") as tar:
        buf = io.BytesIO()
        Image.fromarray(_img(7)).save(buf, format="PNG")
        _add(tar, "...png", buf.getvalue())
        _add(tar, "../evil.png", buf.getvalue())
    return str(d)


def test_every_skipped_sample_is_recorded_and_every_reader_agrees(tmp_path, tricky_corpus, vit_spec):
    out = str(tmp_path / "s.zarr")
    s = extract(tricky_corpus, out, [vit_spec], ExtractOptions(views=2, progress=False, workers=0))
    store = Store.open(out)
    failed0 = {(f["key"], f["error"].split(":")[0]) for f in store.shard_attrs("t-000000")["failed"]}
    failed1 = {(f["key"], f["error"].split(":")[0]) for f in store.shard_attrs("t-000001")["failed"]}
    assert failed0 == {("k1", "duplicate key in shard"), ("bad", "not an image (unidentified format)")}
    assert failed1 == {("..", "tar member '...png' has no sample key"),
                       ("../evil", "sample key with a '.', '..' or leading '/' path segment")}
    assert store.keys("t-000000").tolist() == ["k0", "k1", "k2", "k3"] and s.images == 8 and s.failed == 4
    # the first k1 is the one stored: the same features as a corpus without the duplicate
    clean = tmp_path / "clean"
    clean.mkdir()
    write_tar(str(clean / "t-000000.tar"), [(f"k{i}", _img(i), i % 3, "png") for i in range(4)])
    extract(str(clean), str(tmp_path / "c.zarr"), [vit_spec], ExtractOptions(views=2, progress=False, workers=0))
    np.testing.assert_array_equal(store.array("t-000000", "vit/patch")[:],
                                  Store.open(str(tmp_path / "c.zarr")).array("t-000000", "vit/patch")[:])
    assert verify_store(out, tricky_corpus).problems == []
    r = train(TrainConfig(store=out, data=tricky_corpus, student=STUDENT, out=str(tmp_path / "run"), epochs=1, batch_size=2,
                          workers=0, head_hidden=16, amp="none"), progress=False)
    assert r["steps"] == 4 and not r["stopped_early"]


def test_a_folder_store_with_its_own_shard_size_verifies_and_trains(tmp_path, corpus, vit_spec):
    folder = tmp_path / "folder"
    for tar in sorted(os.listdir(corpus)):
        with tarfile.open(os.path.join(corpus, tar)) as t:
            for m in t.getmembers():
                if m.name.endswith((".png", ".jpg")):
                    cls, name = m.name.split("/", 1)
                    (folder / cls).mkdir(parents=True, exist_ok=True)
                    (folder / cls / name).write_bytes(t.extractfile(m).read())
    out = str(tmp_path / "f.zarr")
    extract(str(folder), out, [vit_spec], ExtractOptions(progress=False, workers=0, folder_shard_size=4))
    store = Store.open(out)
    assert len(store.complete_shards()) == 6 and store.meta.corpus["folder_shard_size"] == 4
    assert verify_store(out, str(folder)).problems == []
    r = train(TrainConfig(store=out, data=str(folder), student=STUDENT, out=str(tmp_path / "run"), epochs=1, batch_size=4,
                          workers=0, head_hidden=16, amp="none"), progress=False)
    assert r["steps"] == 6
