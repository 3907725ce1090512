"""``replay_view`` against torchvision's ``resized_crop`` + flip, run directly: the same uint8
pixels for every interpolation, box and size, including boxes that overhang the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from kdcache.data.pixels import replay_view
from kdcache.data.views import view_box


def _expected(image, view, size, interpolation):
    top, left, h, w, flip = view_box(view, image.shape[-2], image.shape[-1])
    out = TF.resized_crop(image, top, left, h, w, list(size), interpolation=InterpolationMode(interpolation), antialias=True)
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_replay_view_gives_torchvisions_pixels(interpolation):
    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = (int(x) for x in rng.integers(8, 260, 2))
        # as a decoder hands it over: (H, W, 3) memory seen as (3, H, W)
        image = torch.from_numpy(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).permute(2, 0, 1)
        t, l = rng.uniform(0, 0.6, 2)
        h, w = rng.uniform(0.05, 1 - t), rng.uniform(0.05, 1 - l)
        view = np.array([t, l, h, w, rng.integers(0, 2)], dtype=np.float32)
        size = tuple(int(x) for x in rng.integers(4, 240, 2))  # down and up
        got = replay_view(image, view, size, interpolation)
        assert got.dtype == torch.uint8 and got.shape == (3, *size)
        assert torch.equal(got, _expected(image, view, size, interpolation))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_box_over_the_edge_is_padded_as_torchvision_pads_it(interpolation):
    image = torch.arange(3 * 10 * 10, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(3, 10, 10)
    view = np.array([0.55, 0.55, 0.5, 0.5, 0.0], dtype=np.float32)  # rounds to rows 6..10 of 10 (one past the edge)
    top, left, h, w, _ = view_box(view, 10, 10)
    assert top + h > 10 and left + w > 10
    got = replay_view(image, view, (8, 8), interpolation)
    assert torch.equal(got, _expected(image, view, (8, 8), interpolation))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_a_whole_view_at_its_own_size_is_its_own_pixels_as_torchvision_gives_them(interpolation):
    """A stored view's crop read back at its own size skips the resample: torchvision's result is the same pixels."""
    rng = np.random.default_rng(1)
    for height, width in ((64, 64), (37, 91), (224, 224)):
        image = torch.from_numpy(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).permute(2, 0, 1)
        whole = np.array([0.0, 0.0, 1.0, 1.0, 0.0], dtype=np.float32)
        got = replay_view(image, whole, (height, width), interpolation)
        assert torch.equal(got, image) and torch.equal(got, _expected(image, whole, (height, width), interpolation))
