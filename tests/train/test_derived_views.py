"""New views of a finite store (issue 21): sub-views, CutMix/MixUp, dense maps; exact where they must be."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode

from kdcache.data.views import sub_view
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.targets.derive import Mix, cut_grid, dense_targets, draw_mix, mix_pixels, mix_targets

from conftest import VIT, run_cli
from helpers import tar_images


def test_a_box_of_the_whole_grid_gives_the_grid_back_and_a_sub_box_resamples_it():
    g = torch.randn(3, 4 * 6, 8)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    torch.testing.assert_close(cut_grid(g, (4, 6), whole, (4, 6)), g, rtol=0, atol=1e-6)
    # the left half, resampled to 4x3: RoIAlign of the same map written out with torchvision directly
    half = torch.tensor([[0.0, 0.0, 1.0, 0.5]] * 3)
    maps = g.transpose(1, 2).reshape(3, 8, 4, 6)
    ref = roi_align(maps, [torch.tensor([[0.0, 0.0, 3.0, 4.0]])] * 3, output_size=(4, 3), aligned=True)
    torch.testing.assert_close(cut_grid(g, (4, 6), half, (4, 3)), ref.flatten(2).transpose(1, 2))


def test_sub_view_boxes_lie_inside_the_view_and_mirror_with_its_flip():
    view = np.array([0.1, 0.2, 0.6, 0.5, 0.0], np.float32)
    flipped = np.array([0.1, 0.2, 0.6, 0.5, 1.0], np.float32)
    for epoch in range(20):
        student, box = sub_view(view, 0, "k", epoch, 0.25)
        s2, box2 = sub_view(flipped, 0, "k", epoch, 0.25)
        assert 0.25 - 1e-6 <= box[2] * box[3] <= 1 + 1e-6 and (box >= 0).all() and box[0] + box[2] <= 1 + 1e-6
        # the student's crop, in image fractions, is the box inside the stored view
        np.testing.assert_allclose(student[:4], [0.1 + box[0] * 0.6, 0.2 + box[1] * 0.5, box[2] * 0.6, box[3] * 0.5], atol=1e-6)
        np.testing.assert_allclose(s2[:4], student[:4])  # the same pixels are cut ...
        np.testing.assert_allclose(box2, [box[0], 1 - box[1] - box[3], box[2], box[3]], atol=1e-6)  # ... mirrored on the grid
    assert not np.array_equal(sub_view(view, 0, "k", 1, 0.25)[1], sub_view(view, 0, "k", 2, 0.25)[1])  # a new box each epoch


def test_a_cutmix_box_of_zero_area_gives_back_the_first_samples_targets_and_mixup_blends():
    target = {"summary": torch.randn(4, 8), "patch": torch.randn(4, 6, 8)}
    perm = torch.tensor([1, 2, 3, 0])
    empty = Mix("cutmix", perm, 1.0, (0.5, 0.5, 0.0, 0.0))
    out = mix_targets(target, empty, (2, 3))
    torch.testing.assert_close(out["patch"], target["patch"])
    torch.testing.assert_close(out["summary"], target["summary"])
    images = torch.randint(0, 255, (4, 3, 8, 12), dtype=torch.uint8)
    assert torch.equal(mix_pixels(images, empty), images)
    # the right column of a 2x3 grid pasted: cells (0, 2) and (1, 2) from the partner, pixels [:, 8:12]
    col = Mix("cutmix", perm, 1 - 1 / 3, (0.0, 2 / 3, 1.0, 1 / 3))
    out = mix_targets(target, col, (2, 3))
    pasted = [2, 5]
    torch.testing.assert_close(out["patch"][:, pasted], target["patch"][perm][:, pasted])
    kept = [0, 1, 3, 4]
    torch.testing.assert_close(out["patch"][:, kept], target["patch"][:, kept])
    torch.testing.assert_close(out["summary"], target["summary"] * (2 / 3) + target["summary"][perm] / 3)
    mixed = mix_pixels(images, col)
    assert torch.equal(mixed[..., 8:], images[perm][..., 8:]) and torch.equal(mixed[..., :8], images[..., :8])
    up = Mix("mixup", perm, 0.3)
    torch.testing.assert_close(mix_targets(target, up, (2, 3))["patch"], target["patch"] * 0.3 + target["patch"][perm] * 0.7)


def test_mixes_are_seeded_by_step_and_cutmix_boxes_snap_to_the_grid():
    a = draw_mix(8, cutmix=1.0, mixup=0.0, grid=(4, 6), seed=3, step=7, device="cpu")
    b = draw_mix(8, cutmix=1.0, mixup=0.0, grid=(4, 6), seed=3, step=7, device="cpu")
    assert a.kind == "cutmix" and torch.equal(a.perm, b.perm) and a.box == b.box
    top, left, h, w = a.box
    assert all(abs(x * 4 - round(x * 4)) < 1e-9 for x in (top, h)) and all(abs(x * 6 - round(x * 6)) < 1e-9 for x in (left, w))
    assert a.lam == pytest.approx(1 - h * w)
    kinds = {draw_mix(8, cutmix=0.5, mixup=0.4, grid=(4, 6), seed=0, step=s, device="cpu").kind for s in range(40)}
    assert kinds == {"cutmix", "mixup"}
    lams = [draw_mix(8, cutmix=0.0, mixup=0.4, grid=(4, 6), seed=0, step=s, device="cpu").lam for s in range(400)]
    assert 0.45 < float(np.mean(lams)) < 0.55 and min(lams) >= 0 and max(lams) <= 1  # Beta(0.4, 0.4): symmetric, U-shaped
    assert draw_mix(8, cutmix=0.0, mixup=0.0, grid=(4, 6), seed=0, step=0, device="cpu") is None


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory, corpus, weights):
    out = str(tmp_path_factory.mktemp("dense") / "d.zarr")
    spec = f"vit={VIT['model']},pretrained=false,{VIT['kwargs']},checkpoint={weights['vit']}"
    extract(corpus, out, [spec], ExtractOptions(views=3, dense_scale=2, decode="full", progress=False, workers=0))
    return out


def _whole_image_map(weights, image: np.ndarray, size: int) -> torch.Tensor:
    """The teacher run with timm directly on the whole image at size x size: its patch map (T, D)."""
    m = timm.create_model(VIT["model"], pretrained=False, img_size=32, depth=2, dynamic_img_size=True)
    m.load_state_dict(safetensors.torch.load_file(weights["vit"]))
    m.eval()
    x = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [size, size], interpolation=InterpolationMode.BICUBIC,
                  antialias=True)
    x = (x.float()[None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        return m.forward_features(x)[0, 1:]


def test_dense_maps_equal_the_teacher_on_the_whole_image_and_cut_like_roi_align(dense_store, corpus, weights):
    root = zarr.open_group(dense_store, mode="r")
    meta = root.attrs["kdcache"]["teachers"]["vit"]
    assert meta["dense"] == {"scale": 2, "grid": [4, 4]} and meta["model_kwargs"]["dynamic_img_size"] is True
    images = {}
    for tar in sorted(os.listdir(corpus)):
        images.update(tar_images(os.path.join(corpus, tar)))
    g = root["shards/demo-000000"]
    keys = list(g["keys"][:])
    for i in (0, 5):
        ref = _whole_image_map(weights, images[keys[i]], 64)
        np.testing.assert_allclose(g["vit/dense"][i].astype(np.float32), ref.numpy(), rtol=3e-3, atol=3e-3)
        # the eval view's box cut from the stored map at the teacher's 2x2 grid = torchvision's RoIAlign of the map above
        t, l, h, w, flip = g["views"][i, 0]
        cut = dense_targets(torch.from_numpy(g["vit/dense"][i].astype(np.float32))[None], (4, 4),
                            torch.tensor([[t, l, h, w]]), torch.tensor([flip]), (2, 2), pooled_summary=False)
        want = roi_align(ref.T.reshape(1, -1, 4, 4), [torch.tensor([[l * 4, t * 4, (l + w) * 4, (t + h) * 4]])],
                         output_size=(2, 2), sampling_ratio=0, aligned=True)
        np.testing.assert_allclose(cut["patch"][0].numpy(), want.flatten(2).transpose(1, 2)[0].numpy(), rtol=3e-3, atol=3e-3)
        assert cut["summary"] is None  # a CLS teacher: no summary to derive
    # the features of the stored views are unchanged by the dynamic-size model
    plain = str(os.path.join(os.path.dirname(dense_store), "plain.zarr"))
    extract(corpus, plain, [f"vit={VIT['model']},pretrained=false,{VIT['kwargs']},checkpoint={weights['vit']}"],
            ExtractOptions(views=3, decode="full", progress=False, workers=0))
    np.testing.assert_array_equal(zarr.open_group(plain, mode="r")["shards/demo-000000/vit/patch"][:], g["vit/patch"][:])
    info = json.loads(run_cli("info", dense_store, "--json").stdout)["teachers"]["vit"]["dense"]
    assert info["grid"] == [4, 4] and info["bytes_per_image"] > 0


def test_every_option_trains_and_the_derivations_are_measured(tmp_path, dense_store, corpus):
    base = ["--store", dense_store, "--data", corpus, "--student", "vit_tiny_patch16_224,img_size=32,depth=1", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--head-hidden", "8", "--no-progress"]
    for name, extra in (("sub", ["--sub-views", "0.3"]), ("cutmix", ["--cutmix", "1"]), ("mixup", ["--mixup", "0.4"]),
                        ("dense", ["--dense-views"]), ("both", ["--cutmix", "0.5", "--mixup", "0.2", "--sub-views", "0.5"])):
        p = run_cli("train", *base, "--out", str(tmp_path / name), *extra, "--log-every", "1")
        assert p.returncode == 0 and json.loads(p.stdout)["steps"] == 3, (name, p.stderr[-1500:])
        with open(tmp_path / name / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 and all(np.isfinite(float(r["loss"])) for r in rows), name
    r = json.loads(run_cli("eval", "fidelity", "--store", dense_store, "--data", corpus, "--derived", "stored", "--derived",
                           "sub-views", "--derived", "cutmix", "--derived", "mixup", "--derived", "dense", "--samples", "16",
                           "--json").stdout)
    opts = r["options"]
    assert opts["stored"]["patch"] > 0.999 and opts["stored"]["summary"] > 0.999  # only fp16 rounding
    for o in ("sub-views", "cutmix", "mixup", "dense"):
        assert -1 <= opts[o]["patch"] <= 1 and opts[o]["samples"] == 16
    assert opts["dense"]["summary"] is None and opts["cutmix"]["summary"] is not None


@pytest.mark.parametrize("args,match", [
    (["--dense-views"], "has no dense maps (extract it with --dense-scale S)"),
    (["--sub-views", "0.5", "--dense-views"], "choose one"),
    (["--sub-views", "1.5"], "--sub-views"),
    (["--cutmix", "1", "--predict-codes"], "codes cannot be"),
    (["--view-choice", "all", "--sub-views", "0.5"], "--view-choice all delivers a store's K stored views"),
    (["--view-choice", "all", "--dense-views"], "--dense-views draws views of its own"),
])
def test_derived_options_refused_in_one_line(tmp_path, vit_store, corpus, args, match):
    p = run_cli("train", "--store", vit_store, "--data", corpus, "--student", "resnet18,img_size=32", "--out",
                str(tmp_path / "r"), "--workers", "0", *args, check=False)
    assert p.returncode == 2 and match in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert not os.path.exists(tmp_path / "r" / "config.json")


def test_grid_and_size_refusals(tmp_path, corpus):
    one_cell = str(tmp_path / "one.zarr")  # a ResNet at 32 px: a 1x1 patch grid, nothing to cut boxes from
    extract(corpus, one_cell, ["cnn=resnet18,pretrained=false,img_size=32"], ExtractOptions(views=2, progress=False, workers=0))
    p = run_cli("train", "--store", one_cell, "--data", corpus, "--student", "resnet18,img_size=32", "--out",
                str(tmp_path / "r"), "--workers", "0", "--cutmix", "1", check=False)
    assert p.returncode == 2 and "1x1 patch grid" in p.stderr
    # a model with a fixed token count cannot run at another size: --dense-scale refused before anything is written
    p = run_cli("extract", corpus, "-o", str(tmp_path / "m.zarr"), "-t", "m=mixer_s16_224,pretrained=false,img_size=32",
                "--dense-scale", "2", check=False)
    assert p.returncode == 2 and "--dense-scale 2" in p.stderr and "cannot run at 64x64" in p.stderr, p.stderr[-1500:]
    assert not os.path.exists(tmp_path / "m.zarr")
    assert Store.exists(one_cell)
