"""Reduced JPEG decodes: the scale libjpeg offers that still gives every crop its output size."""
from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import InterpolationMode

from kdcache.data.corpus import CorpusError, DecodeOptions, ReadOptions
from kdcache.data.demo_corpus import write_tar
from kdcache.data.pixels import Crop, crop_need, decode_image, view_pixels
from kdcache.data.walk import RawSample, record_to
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract

FULL, REDUCED = DecodeOptions(reduced=False), DecodeOptions(reduced=True)


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    """scikit-learn's china.jpg (427 x 640), re-encoded: a real photo of a realistic size."""
    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pil_scale(h: int, w: int, nh: int, nw: int) -> int:
    """The rule, written out: the largest of 8, 4, 2, 1 whose decode, ceil((H, W) / scale), is at
    least (nh, nw)."""
    return next((s for s in (8, 4, 2, 1) if -(-h // s) >= nh and -(-w // s) >= nw), 1)


@pytest.mark.parametrize("need", [(64, 64), (100, 150), (200, 300), (427, 640), (500, 700), (1, 1)])
def test_the_decode_keeps_at_least_what_is_needed_at_the_largest_scale(photo_jpeg, need):
    full = decode_image(photo_jpeg, FULL)
    assert full.shape == (427, 640, 3)
    seen = []
    small = decode_image(photo_jpeg, REDUCED, lambda h, w: seen.append((h, w)) or need)
    assert seen == [(427, 640)]  # asked with the full size, once
    s = _pil_scale(427, 640, *need)
    assert small.shape == (math.ceil(427 / s), math.ceil(640 / s), 3)
    assert small.shape[0] >= min(need[0], 427) and small.shape[1] >= min(need[1], 640)
    # full decodes ignore the need, and so do other formats
    assert decode_image(photo_jpeg, FULL, lambda h, w: need).shape == (427, 640, 3)
    png = io.BytesIO()
    Image.fromarray(full).save(png, "PNG")
    assert decode_image(png.getvalue(), REDUCED, lambda h, w: need).shape == (427, 640, 3)


def _views() -> np.ndarray:
    # (top, left, height, width, flip) in fractions: a smaller box, a large flipped one, the centred eval box
    return np.array([[0.1, 0.2, 0.5, 0.4, 0.0], [0.05, 0.0, 0.9, 0.8, 1.0], [0.0, 0.1666, 1.0, 0.6667, 0.0]],
                    dtype=np.float32)


def _crops(data: bytes, views: np.ndarray, size: int, opts: DecodeOptions) -> torch.Tensor:
    sample = RawSample(key="china", data=data, fields=("jpg",), label=None, row=0)
    skipped = []
    [item] = view_pixels([sample], views=lambda s, h, w: views, crops=[Crop((size, size), "bicubic")], decode=opts,
                         handler=record_to(skipped))
    assert not skipped
    np.testing.assert_array_equal(item.views, views)  # the same boxes, in fractions
    return item.crops[0].float()


@pytest.mark.parametrize("size,scale", [(32, 4), (64, 2), (112, 1)])
def test_reduced_crops_match_full_decodes_at_the_output_size(photo_jpeg, size, scale):
    views = _views()
    nh, nw = crop_need(views, [Crop((size, size), "bicubic")])(427, 640)
    assert _pil_scale(427, 640, nh, nw) == scale  # the decode these crops get
    full, reduced = _crops(photo_jpeg, views, size, FULL), _crops(photo_jpeg, views, size, REDUCED)
    assert full.shape == reduced.shape == (3, 3, size, size)
    diff = (full - reduced).abs()
    # measured: mean |diff| 3.5-4.5 of 255 at a reduced scale (4.5 over 40 random views of both photos at 64 px),
    # 0 at full scale; boxes moved by 1% of the image give 13-14: the tolerance tells a right box from a wrong one
    assert diff.mean() < 6.0
    if scale == 1:
        assert float(diff.max()) == 0
    shifted = views.copy()
    shifted[:, :2] += 0.01
    assert (full - _crops(photo_jpeg, shifted, size, FULL)).abs().mean() > 10.0
    # and the full decode is what torchvision gives on the whole image: nothing changed there
    whole = torch.from_numpy(np.array(Image.open(io.BytesIO(photo_jpeg)).convert("RGB"))).permute(2, 0, 1)
    t, l, h, w, _ = views[0]
    ref = TF.resized_crop(whole, round(t * 427), round(l * 640), round(h * 427), round(w * 640), [size, size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    np.testing.assert_array_equal(full[0].numpy(), ref.float().numpy())


def test_the_needed_size_gives_every_box_at_least_its_output():
    views, crops = _views(), [Crop((64, 64), "bilinear"), Crop((96, 80), "bilinear")]
    nh, nw = crop_need(views, crops)(427, 640)
    for s in (1, 2, 4, 8):
        if math.ceil(427 / s) >= nh and math.ceil(640 / s) >= nw:  # a scale the decode may pick: every box still >= every output
            h, w = math.ceil(427 / s), math.ceil(640 / s)
            assert (np.round(views[:, 2] * h) >= 96).all() and (np.round(views[:, 3] * w) >= 80).all()


def test_old_stores_decode_at_full_size_and_hostile_decode_options_are_one_line():
    assert DecodeOptions.from_dict(None).reduced is False
    assert DecodeOptions.from_dict({"max_pixels": 10, "min_size": 3}).reduced is False  # recorded before `reduced`
    assert ReadOptions.from_dict({}).decode.reduced is False
    assert DecodeOptions.from_dict(DecodeOptions().to_dict()) == DecodeOptions() and DecodeOptions().reduced
    for bad, word in (({"evil": 1}, "evil"), ({"max_pixels": "x"}, "max_pixels"), ({"reduced": "yes"}, "reduced"),
                      ([1], "decode")):
        with pytest.raises(CorpusError, match=word):
            DecodeOptions.from_dict(bad)


def test_extraction_records_the_decode_and_stores_the_same_views_either_way(tmp_path, photo_jpeg):
    corpus = tmp_path / "c"
    os.makedirs(corpus)
    img = np.array(Image.open(io.BytesIO(photo_jpeg)))
    write_tar(str(corpus / "a.tar"), [(f"p{i}", img[i * 20:, i * 30:], None, "jpg") for i in range(4)])
    spec = "vit=vit_tiny_patch16_224,pretrained=false,img_size=64,depth=1"
    stores = {}
    for mode in ("full", "reduced"):
        out = str(tmp_path / f"{mode}.zarr")
        extract(str(corpus), out, [spec], ExtractOptions(views=3, decode=mode, progress=False, workers=0))
        stores[mode] = out
    import zarr
    a, b = (zarr.open_group(stores[m], mode="r") for m in ("full", "reduced"))
    assert a.attrs["kdcache"]["corpus"]["decode"]["reduced"] is False
    assert b.attrs["kdcache"]["corpus"]["decode"]["reduced"] is True
    np.testing.assert_array_equal(a["shards/a/views"][:], b["shards/a/views"][:])
    fa, fb = (np.asarray(g["shards/a/vit/cls"][:], dtype=np.float32) for g in (a, b))
    cos = (fa * fb).sum(-1) / np.linalg.norm(fa, axis=-1) / np.linalg.norm(fb, axis=-1)
    assert cos.min() > 0.98 and not np.array_equal(fa, fb)  # other pixels, nearly the same features


def _jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["420", "444-progressive", "grey"])
def test_jpegs_decode_to_pils_pixels_at_every_scale(kind, scale):
    """libjpeg-turbo through simplejpeg gives the pixels PIL gives (its draft at the same scale)."""
    photo = load_sample_images().images[1]
    if kind == "grey":
        data = _jpeg(photo.mean(axis=2).astype(np.uint8), quality=85)
    else:
        data = _jpeg(photo, quality=90, subsampling=0 if kind.startswith("444") else 2, progressive="progressive" in kind)
    h, w = 427, 640
    need = (math.ceil(h / scale), math.ceil(w / scale))
    ours = decode_image(data, REDUCED, lambda hh, ww: need)
    ref = Image.open(io.BytesIO(data))
    if scale > 1:
        ref.draft(None, (w // scale, h // scale))  # PIL: the largest scale s with W // s, H // s >= these
    ref = np.array(ref.convert("RGB"))
    assert ours.shape == ref.shape == (*need, 3)
    np.testing.assert_array_equal(ours, ref)


def test_jpegs_libjpeg_turbo_refuses_go_to_pil(photo_jpeg):
    """CMYK JPEGs, and JPEGs libjpeg-turbo only warns about (strict there), are PIL's to decode;
    a truncated JPEG is refused with PIL's reason either way."""
    ref = np.array(Image.open(io.BytesIO(photo_jpeg)).convert("RGB"))
    sos = photo_jpeg.index(b"\xff\xda")
    extraneous = photo_jpeg[:sos] + b"\x00\x00\x00" + photo_jpeg[sos:]
    calls = []
    np.testing.assert_array_equal(decode_image(extraneous, REDUCED, lambda h, w: calls.append(1) or (427, 640)), ref)
    assert calls == [1]  # the views are drawn once, though two decoders looked at the image
    cmyk = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).convert("CMYK").save(cmyk, "JPEG", quality=95)
    np.testing.assert_array_equal(decode_image(cmyk.getvalue(), FULL),
                                  np.array(Image.open(io.BytesIO(cmyk.getvalue())).convert("RGB")))
    from kdcache.data.pixels import BadImage
    with pytest.raises(BadImage, match="corrupt or truncated"):
        decode_image(photo_jpeg[: len(photo_jpeg) // 2], REDUCED)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(photo_jpeg, DecodeOptions(max_pixels=1000))
    with pytest.raises(BadImage, match="too small"):
        decode_image(photo_jpeg, DecodeOptions(min_size=500))
