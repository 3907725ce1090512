"""Bad images are converted or skipped and recorded; bad invocations fail in one line."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import zarr
from PIL import Image

from helpers import cli_call, one_error_line

from kdcache.extract.options import ExtractOptions

from kdcache.extract.run import extract
from kdcache.data.pixels import BadImage, decode_image
from kdcache.data.demo_corpus import write_tar
from kdcache.store import Store


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _photo(size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


GOOD_KEYS = ["a/b/ünïcødé-ключ", "conv/16bit", "conv/cmyk", "conv/gray", "conv/palette", "conv/rgba", "ok/plain"]
BAD = {
    "bad/empty": "empty file",
    "bad/text": "not an image",
    "bad/truncated": "corrupt or truncated",
    "bad/bomb": "decompression bomb",
    "bad/tiny": "too small: 1x1",
    "bad/noimage": "no image field",
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    jpeg = _png(_photo((64, 48)), "JPEG")
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1)))
    samples = [
        ("ok/plain", _png(_photo()), 1, "png"),
        ("bad/empty", b"", 2, "jpg"),
        ("a/b/ünïcødé-ключ", _png(_photo()), 3, "png"),
        ("bad/text", b"hello, I am not an image", 4, "jpg"),
        ("bad/truncated", jpeg[: len(jpeg) // 2], 5, "jpg"),
        ("bad/bomb", _png(Image.new("1", (9000, 9000))), 6, "png"),
        ("conv/16bit", _png(sixteen), 7, "png"),
        ("conv/cmyk", _png(_photo().convert("CMYK"), "JPEG"), 8, "jpg"),
        ("conv/rgba", _png(_photo().convert("RGBA")), 9, "png"),
        ("conv/gray", _png(_photo().convert("L")), 10, "png"),
        ("conv/palette", _png(_photo().convert("P")), 11, "png"),
        ("bad/tiny", _png(Image.new("RGB", (1, 1))), 12, "png"),
    ]
    write_tar(str(d / "bad-000000.tar"), samples)
    # a sample with only a label, no image
    import tarfile
    with tarfile.open(d / "bad-000000.tar", "a") as tar:
        info = tarfile.TarInfo("bad/noimage.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    return str(d)


def test_bad_images_are_skipped_and_recorded_the_rest_converted(tmp_path, bad_corpus, vit_spec):
    out = str(tmp_path / "s.zarr")
    s = extract(bad_corpus, out, [vit_spec], ExtractOptions(progress=False, workers=0, max_pixels=50_000_000))
    assert s.images == len(GOOD_KEYS) and s.failed == len(BAD)
    g = zarr.open_group(out, mode="r")["shards/bad-000000"]
    assert g.attrs["complete"] is True and g.attrs["count"] == len(GOOD_KEYS)
    assert sorted(g["keys"][:].tolist()) == sorted(GOOD_KEYS)  # non-ASCII key with separators intact
    failed = {f["key"]: f["error"] for f in g.attrs["failed"]}
    assert set(failed) == set(BAD)
    for key, reason in BAD.items():
        assert reason in failed[key], (key, failed[key])
    assert np.isfinite(g["vit/patch"][:].astype(np.float32)).all()


def test_decode_conversions():
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(3, 0))
    rgb = decode_image(_png(sixteen))
    assert rgb.shape == (3, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])  # rescaled, not clipped at 255
    gray = decode_image(_png(Image.new("L", (4, 4), 77)))
    assert gray.shape == (4, 4, 3) and (gray == 77).all()
    cmyk = decode_image(_png(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # red stays red
    rgba = decode_image(_png(Image.new("RGBA", (4, 4), (10, 20, 30, 0))))
    assert rgba.shape == (4, 4, 3) and tuple(rgba[0, 0]) == (10, 20, 30)
    with pytest.raises(BadImage, match="decompression bomb"):
        from kdcache.data.corpus import DecodeOptions
        decode_image(_png(Image.new("RGB", (200, 200))), DecodeOptions(max_pixels=10_000))


@pytest.mark.parametrize("workers", ["0", "1"])  # 1: the error is raised in a DataLoader worker process
def test_on_error_fail_stops_with_one_line_naming_the_key(tmp_path, bad_corpus, vit_spec, monkeypatch, capsys, workers):
    out = str(tmp_path / "s.zarr")
    code, _, err = cli_call(monkeypatch, capsys, "extract", bad_corpus, "--out", out, "-t", vit_spec, "--on-error", "fail",
                            "--workers", workers, "--no-progress")
    assert code == 2
    line = one_error_line(err)
    assert "'bad/empty'" in line and "empty file" in line and "bad-000000.tar" in line
    assert Store.open(out).complete_shards() == []


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_model", "bad_checkpoint", "unwritable", "bad_spec"])
def test_bad_invocations_fail_in_one_line(tmp_path, corpus, weights, vit_spec, monkeypatch, capsys, case):
    data, out, teacher = corpus, str(tmp_path / "s.zarr"), vit_spec
    expect = {
        "missing": "no such file or directory", "empty": "empty corpus", "unknown_model": "unknown timm model 'no_such_net'",
        "bad_checkpoint": "does not fit resnet18", "unwritable": "cannot create the store directory",
        "bad_spec": "NAME must be letters",
    }[case]
    if case == "missing":
        data = str(tmp_path / "nowhere")
    elif case == "empty":
        data = str(tmp_path / "emptydir")
        os.makedirs(data)
    elif case == "unknown_model":
        teacher = "x=no_such_net,pretrained=false"
    elif case == "bad_checkpoint":
        teacher = f"cnn=resnet18,pretrained=false,checkpoint={weights['vit']}"
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        out = str(tmp_path / "afile" / "store.zarr")
    elif case == "bad_spec":
        teacher = "keys=resnet18"
    code, _, err = cli_call(monkeypatch, capsys, "extract", data, "--out", out, "-t", teacher, "--no-progress")
    assert code == 2
    assert expect in one_error_line(err)
    if case != "unwritable":
        assert not os.path.exists(out) or Store.open(out).complete_shards() == []


def test_foreign_directory_is_not_overwritten(tmp_path, corpus, vit_spec, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = cli_call(monkeypatch, capsys, "extract", corpus, "--out", str(out), "-t", vit_spec, "--no-progress")
    assert code == 2 and "not a kdcache store" in one_error_line(err)
    assert os.listdir(out) == ["precious.txt"]


def test_other_corpus_into_same_store_is_refused(tmp_path, corpus, many_shards, vit_spec):
    out = str(tmp_path / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(progress=False, workers=0))
    from kdcache.extract.options import ExtractError
    with pytest.raises(ExtractError, match="different corpus"):
        extract(many_shards, out, [vit_spec], ExtractOptions(progress=False, workers=0))
