"""A store that keeps its views' pixels (``extract --pixels``, ``kdcache store pixels``): the pixels
are the teacher's crops (readable with plain zarr and simplejpeg), a student trains from the store
alone with the same keys and targets as from the corpus, and damage or misuse is one line."""
from __future__ import annotations

import glob
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import simplejpeg
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from helpers import cli_call, one_error_line, store_stream, tar_images
from torchvision.transforms import InterpolationMode

from kdcache.data.pixels import decode_views
from kdcache.data.stream import read_skips
from kdcache.data.transport import collate
from kdcache.errors import CorruptShardError, KdcacheError
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.train.config import ConfigError, TrainConfig
from kdcache.train.fit import train
from kdcache.train.sources import TrainError

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


@pytest.fixture(scope="module")
def stores(tmp_path_factory, corpus, vit_spec):
    d = tmp_path_factory.mktemp("pixels")
    out = {}
    for name, pixels in (("jpeg", ""), ("raw", "24:raw")):
        out[name] = str(d / f"{name}.zarr")
        extract(corpus, out[name], [vit_spec], ExtractOptions(views=2, pixels=pixels, progress=False, workers=0))
    return out


def _reference(image: np.ndarray, view, size, interpolation="bicubic") -> np.ndarray:
    """The view's crop as an independent reader cuts it: PIL's decode, torchvision's resized_crop."""
    h, w = image.shape[:2]
    t, l, ch, cw, flip = (float(x) for x in view)
    x = TF.resized_crop(torch.from_numpy(image).permute(2, 0, 1), round(t * h), round(l * w), round(ch * h), round(cw * w),
                        list(size), interpolation=InterpolationMode(interpolation), antialias=True)
    return (x.flip(-1) if flip >= 0.5 else x).permute(1, 2, 0).numpy()


def test_the_stored_pixels_are_the_teachers_crops_read_with_plain_zarr(stores, corpus):
    images = {}
    for tar in glob.glob(os.path.join(corpus, "*.tar")):
        images.update(tar_images(tar))
    for kind in ("jpeg", "raw"):
        root = zarr.open_group(stores[kind], mode="r")
        px = root.attrs["kdcache"]["pixels"]
        assert px["format"] == kind and px["size"] == ([32, 32] if kind == "jpeg" else [24, 24])
        for name, g in root["shards"].groups():
            keys, views = g["keys"][:].tolist(), g["views"][:]
            for i, key in enumerate(keys):
                for v in range(2):
                    want = _reference(images[key], views[i, v], px["size"]).astype(np.int16)
                    if kind == "raw":
                        got = g["pixels/raw"][i, v]
                        assert np.abs(got.astype(np.int16) - want).max() <= 1  # (the same resize, one rounding apart)
                    else:  # the documented plain-zarr read: a JPEG's bytes are heap[offset:offset + length]
                        offset, length = g["pixels/spans"][i, v]
                        got = simplejpeg.decode_jpeg(g["pixels/jpeg"][offset:offset + length].tobytes()).astype(np.int16)
                        # exactly the reference crop through JPEG at the store's quality (4:4:4), within rounding;
                        # what JPEG itself costs a 32-px crop of a photo: a few levels of 255
                        again = simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(
                            np.ascontiguousarray(want.astype(np.uint8)), quality=px["quality"], colorsubsampling="444"))
                        assert np.abs(got - again).max() <= 2 and np.abs(got - want).mean() < 6.0, (key, v)
    s = Store.open(stores["jpeg"])
    name = s.complete_shards()[0]
    assert len(s.read_pixels(name, 0, 8, view=1)) == 8


@pytest.mark.parametrize("kind", ["jpeg", "raw"])
def test_a_run_from_the_store_alone_delivers_the_keys_and_targets_of_a_run_from_the_corpus(stores, corpus, kind):
    size = (32, 32) if kind == "jpeg" else (24, 24)
    for epoch in (0, 1):
        a = list(store_stream(stores[kind], corpus, ("vit/cls", "vit/patch"), epoch=epoch, size=size, workers=0))
        b = list(store_stream(stores[kind], corpus, ("vit/cls", "vit/patch"), epoch=epoch, size=size, source="pixels"))
        c = list(store_stream(stores[kind], None, ("vit/cls", "vit/patch"), epoch=epoch, size=size, source="pixels"))
        assert [x["key"] for x in a] == [x["key"] for x in b] == [x["key"] for x in c] and len(a) == 24
        for x, y in zip(a, c):
            assert x["view"] == y["view"] and x["label"] == y["label"]
            assert torch.equal(x["vit/cls"], y["vit/cls"]) and torch.equal(x["vit/patch"], y["vit/patch"])
            assert (x["image"].float() - decode_views([y["image"]])[0].float()).abs().mean() < 6.0  # the stored crop, resized


def _stored_decodes(url: str) -> dict:
    """{(key, view): the stored view's pixels, (h, w, 3)}: read with plain zarr, decoded by simplejpeg."""
    out = {}
    for _, g in zarr.open_group(url, mode="r")["shards"].groups():
        keys, spans, heap = g["keys"][:].tolist(), g["pixels/spans"][:], g["pixels/jpeg"][:]
        for i, key in enumerate(keys):
            for v in range(spans.shape[1]):
                offset, length = spans[i, v]
                out[(key, v)] = simplejpeg.decode_jpeg(heap[offset:offset + length].tobytes())
    return out


def _batches(stream, batch_size=5):
    samples = list(stream)
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def test_stored_views_are_decoded_into_their_batch_as_plain_simplejpeg_and_torchvision_would(stores):
    plain = _stored_decodes(stores["jpeg"])
    for size in ((32, 32), (24, 24)):  # the stored size (decoded into the batch), and a smaller student (resized)
        batches = _batches(store_stream(stores["jpeg"], None, ("vit/cls",), size=size, source="pixels", epoch=1))
        assert sum(len(b["key"]) for b in batches) == 24
        for b in batches:
            assert b["image"].shape[1:] == (3, *size) and b["image"].dtype == torch.uint8
            # channels-last in memory: each view decoded in place, no channel move
            assert b["image"].is_contiguous(memory_format=torch.channels_last) and not b["image"].is_contiguous()
            for key, view, image in zip(b["key"], b["view"].tolist(), b["image"]):
                want = torch.from_numpy(plain[(key, view)]).permute(2, 0, 1)
                if size != (32, 32):
                    want = TF.resize(want, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
                assert torch.equal(image, want), (key, view, size)
    # views of two sizes are not one batch
    one = next(iter(store_stream(stores["jpeg"], None, (), source="pixels")))["image"]
    other = next(iter(store_stream(stores["jpeg"], None, (), size=(24, 24), source="pixels")))["image"]
    with pytest.raises(KdcacheError, match=r"a batch of 32x32 views holds one of 24x24"):
        decode_views([one, other])
    # a channels-first buffer given gets the same pixels, through a copy
    views = [s["image"] for s in itertools.islice(store_stream(stores["jpeg"], None, (), source="pixels"), 4)]
    into = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    assert decode_views(views, into) is into and into.is_contiguous()
    assert torch.equal(into, decode_views(views))


def test_sub_views_colour_jitter_and_every_view_work_on_stored_pixels(stores):
    from torchvision.transforms import v2

    from kdcache.data.views import sub_view
    from kdcache.data.stream import _sample_seed
    s = Store.open(stores["jpeg"])
    boxes = {k: s.views(n)[i] for n in s.complete_shards() for i, k in enumerate(s.keys(n).tolist())}
    plain = _stored_decodes(stores["jpeg"])
    # --sub-views: the sub-box of the stored crop, resized to the student's input; its box in the sample
    for b in _batches(store_stream(stores["jpeg"], None, (), size=(24, 24), source="pixels", sub_views=0.5, epoch=2)):
        for key, view, image, box in zip(b["key"], b["view"].tolist(), b["image"], b["sub_box"]):
            _, want_box = sub_view(boxes[key][view], 0, key, 2, 0.5)
            np.testing.assert_allclose(box.numpy(), want_box)
            want = _reference(plain[(key, view)], [*want_box, 0.0], (24, 24))
            assert np.abs(image.permute(1, 2, 0).numpy().astype(np.int16) - want.astype(np.int16)).max() <= 1, key
    # --color-jitter: each sample jittered with its own seed, the same with a DataLoader worker as without
    plain_run = _batches(store_stream(stores["jpeg"], None, (), source="pixels", epoch=1))
    jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
    for workers in (0, 1):
        stream = store_stream(stores["jpeg"], None, (), source="pixels", epoch=1, color_jitter=0.4, workers=workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=5, num_workers=workers, collate_fn=collate)
        order = stream.spec.order(1)
        position = {order[i].position: order[i] for i in range(order.total)}  # (every position's sample)
        got = list(loader)
        assert [k for b in got for k in b["key"]] == [k for b in plain_run for k in b["key"]]
        changed = 0
        for b, p in zip(got, plain_run):
            for i, off in enumerate(b["offset"].tolist()):
                sample = position[off]  # (one stream: offsets are positions)
                torch.manual_seed(_sample_seed(0, 1, sample.position, sample.slot))
                want = jitter(p["image"][i])
                assert torch.equal(b["image"][i], want)
                changed += int(not torch.equal(want, p["image"][i]))
        assert changed > 0
    # --view-choice all: every stored view of every image, each its own stored crop
    got = _batches(store_stream(stores["jpeg"], None, (), source="pixels", view_choice="all"))
    seen = sorted((k, v) for b in got for k, v in zip(b["key"], b["view"].tolist()))
    assert seen == sorted(plain)
    for b in got:
        for key, view, image in zip(b["key"], b["view"].tolist(), b["image"]):
            assert torch.equal(image, torch.from_numpy(plain[(key, view)]).permute(2, 0, 1))


def test_a_stored_jpeg_that_passes_its_checksum_but_does_not_decode_is_one_line(stores, tmp_path):
    """A store written wrong (or by someone else) with a consistent checksum: the batch names the sample."""
    from kdcache.data.pixels import StoredView
    from kdcache.data.corpus import DecodeOptions
    from kdcache.data.pixels import Crop
    bad = StoredView("k1", b"\xff\xd8\xff" + b"\x00" * 40, Crop((32, 32), "bicubic"), DecodeOptions())
    with pytest.raises(KdcacheError, match=r"^sample 'k1': its stored view pixels do not decode \("):
        decode_views([bad])
    bomb = StoredView("k2", simplejpeg.encode_jpeg(np.zeros((64, 64, 3), np.uint8)), Crop((32, 32), "bicubic"),
                      DecodeOptions(max_pixels=1000))
    with pytest.raises(KdcacheError, match=r"sample 'k2': .*decompression bomb"):
        decode_views([bomb])


def test_training_from_stored_pixels_with_every_student_augmentation(tmp_path, stores):
    out = train(TrainConfig(store=stores["jpeg"], student=STUDENT, out=str(tmp_path / "aug"), epochs=1, batch_size=4,
                            workers=1, head_hidden=16, amp="none", color_jitter=0.4, sub_views=0.5, cutmix=0.5,
                            mixup=0.2, log_every=1), progress=False)
    import csv
    with open(tmp_path / "aug" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert out["steps"] == 6 and len(rows) == 6 and all(np.isfinite(float(r["loss"])) for r in rows)


def test_training_without_the_corpus_and_its_refusals(tmp_path, stores, corpus, vit_spec, monkeypatch, capsys):
    out = train(TrainConfig(store=stores["jpeg"], student=STUDENT, out=str(tmp_path / "run"), epochs=1, batch_size=4,
                            workers=0, head_hidden=16, amp="none", log_keys=True), progress=False)
    assert out["steps"] == 6
    keys = [k for line in open(tmp_path / "run" / "keys" / "rank0.jsonl") for k in json.loads(line)["keys"]]
    assert sorted(keys) == sorted(k for n in Store.open(stores["jpeg"]).complete_shards()
                                  for k in Store.open(stores["jpeg"]).keys(n).tolist())
    with pytest.raises(TrainError, match=r"the student's input 48x48 is larger than the 32x32 pixels"):
        train(TrainConfig(store=stores["jpeg"], student="vit_tiny_patch16_224,img_size=48,depth=1",
                          out=str(tmp_path / "big"), epochs=1, workers=0), progress=False)
    plain = str(tmp_path / "plain.zarr")
    extract(corpus, plain, [vit_spec], ExtractOptions(views=2, progress=False, workers=0))
    with pytest.raises(TrainError, match=r"--data is required: .* keeps no pixels \(extract --pixels, or kdcache store "
                                         r"pixels"):
        train(TrainConfig(store=plain, student=STUDENT, out=str(tmp_path / "none"), epochs=1, workers=0), progress=False)
    with pytest.raises(ConfigError, match="--data is required: --dense-views cuts fresh views from the corpus"):
        TrainConfig(store=stores["jpeg"], student=STUDENT, out=str(tmp_path / "d"), dense_views=True)
    code, _, err = cli_call(monkeypatch, capsys, "train", "--online", "--teacher", "x=resnet18", "--student", STUDENT,
                            "--out", str(tmp_path / "o"))
    assert code == 2 and "--data is required: --online cuts fresh views from the corpus" in one_error_line(err)


def _damage_jpeg_run(url: str) -> str:
    """Flip a byte of the JPEG heap (inside the second shard's first run); return that shard."""
    s = Store.open(url)
    name = s.complete_shards()[1]
    obj = glob.glob(os.path.join(url, "shards", name, "pixels", "jpeg", "c", "*"))[0]
    data = bytearray(open(obj, "rb").read())
    data[40] ^= 0xFF  # past Blosc's 16-byte header: a byte of the first JPEG
    open(obj, "wb").write(bytes(data))
    return name


def test_a_damaged_pixel_block_is_refused_in_one_line_or_skipped_and_recorded(stores, tmp_path):
    url = str(tmp_path / "d.zarr")
    shutil.copytree(stores["jpeg"], url)
    bad = _damage_jpeg_run(url)
    with pytest.raises(CorruptShardError, match=rf"shard {bad}: pixels/jpeg: block 0 view \d does not match the checksum"):
        list(store_stream(url, None, ("vit/cls",), source="pixels", view_choice="first"))
    log = str(tmp_path / "skips.jsonl")
    keys = [x["key"] for x in store_stream(url, None, ("vit/cls",), source="pixels", view_choice="first", skip_log=log)]
    assert len(keys) == 16 and [(r["shard"], r["samples_skipped"]) for r in read_skips(log)] == [(bad, 8)]
    from kdcache.store.verify import verify
    assert any(bad in p and "pixels/jpeg" in p for p in verify(Store.open(url)).problems)


def test_store_pixels_gives_a_store_its_pixels_as_extraction_would_and_copies_carry_them(tmp_path, corpus, vit_spec,
                                                                                         stores, monkeypatch, capsys):
    url = str(tmp_path / "later.zarr")
    extract(corpus, url, [vit_spec], ExtractOptions(views=2, progress=False, workers=0))
    code, out, err = cli_call(monkeypatch, capsys, "store", "pixels", url, "--data", corpus, "--workers", "0",
                              "--no-progress")
    assert code == 0 and json.loads(out)["shards_written"] == 3, err
    a, b = Store.open(url), Store.open(stores["jpeg"])
    for name in a.complete_shards():
        assert a.read_pixels(name, 0, 8, view=1) == b.read_pixels(name, 0, 8, view=1)  # byte for byte
    code, out, _ = cli_call(monkeypatch, capsys, "store", "pixels", url, "--data", corpus, "--no-progress")
    assert code == 0 and json.loads(out)["shards_already_there"] == 3 and json.loads(out)["shards_written"] == 0
    code, _, err = cli_call(monkeypatch, capsys, "store", "pixels", url, "--data", corpus, "--pixels", "16:raw")
    assert code == 2 and "keeps pixels as" in one_error_line(err)
    copy = str(tmp_path / "copy.zarr")
    code, _, err = cli_call(monkeypatch, capsys, "store", "copy", url, copy, "--no-progress")
    assert code == 0, err
    c = Store.open(copy)
    assert c.meta.pixels == a.meta.pixels and all(c.read_pixels(n, 0, 8, view=0) == a.read_pixels(n, 0, 8, view=0)
                                                  for n in c.complete_shards())
    code, out, _ = cli_call(monkeypatch, capsys, "info", copy)
    assert "pixels     every view's crop at 32x32 (JPEG quality 90" in out


def test_stored_pixels_on_s3_are_read_by_range_in_few_requests_and_equal_the_local_ones(stores, s3):
    """A block's view JPEGs on object storage: its spans in one request, the heap shard's index once
    per reader (a suffix range), the run itself in one ranged GET; the same bytes as locally, and
    the same batches."""
    bucket = s3.bucket()
    s3.fs.put(stores["jpeg"], f"{bucket}/p.zarr", recursive=True)
    url = f"s3://{bucket}/p.zarr"
    local, remote = Store.open(stores["jpeg"]), Store.open(url)
    name = local.complete_shards()[0]
    remote.read_pixels(name, 0, 8, view=0)  # (the arrays' metadata and the heap's index: read once per reader)
    s3.server.reset()
    for view in (0, 1):
        assert remote.read_pixels(name, 0, 8, view=view) == local.read_pixels(name, 0, 8, view=view)
    assert s3.server.requests() == 4  # per view: its spans block, its JPEG run
    a = _batches(store_stream(stores["jpeg"], None, ("vit/cls",), source="pixels", epoch=1))
    b = _batches(store_stream(url, None, ("vit/cls",), source="pixels", epoch=1))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["vit/cls"], y["vit/cls"]) for x, y in zip(a, b))
