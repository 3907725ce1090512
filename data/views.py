"""The K stored views of an image: drawn once at extraction, replayed exactly at training.

A view is ``(top, left, height, width, flip)`` with the box in fractions of the decoded
image's height and width, so it replays at whatever resolution the image is decoded. View 0
is the teacher's eval view (centred crop of ``crop_pct``); views 1..K-1 are
RandomResizedCrop + horizontal flip from a generator seeded by ``(seed, key, view)``, so the
same parameters come back from the key and image size alone, on any machine.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from kdcache.store import KdcacheError, ViewPolicy

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}\0{view}".encode("utf-8")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def eval_box(policy: ViewPolicy, height: int, width: int) -> tuple[int, int, int, int]:
    """timm's eval transform (resize short side to size/crop_pct, centre crop) as a box."""
    if policy.aspect == 1.0:
        ch = cw = max(1, round(policy.crop_pct * min(height, width)))
    else:
        ch, cw = max(1, round(policy.crop_pct * height)), max(1, round(policy.crop_pct * width))
    return round((height - ch) / 2), round((width - cw) / 2), ch, cw


def rrc_box(rng: np.random.Generator, policy: ViewPolicy, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng`` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(policy.scale[0], policy.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(policy.ratio):
        w, h = width, int(round(width / min(policy.ratio)))
    elif in_ratio > max(policy.ratio):
        h, w = height, int(round(height * max(policy.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def view_at(policy: ViewPolicy, key: str, index: int, height: int, width: int) -> np.ndarray:
    """(5,) float32: view ``index`` of image ``key``: 0 the eval view, any index >= 1 a
    RandomResizedCrop + flip from ``view_rng(seed, key, index)``. Indices beyond K are the
    fresh views of online distillation (``train --online``): the sequence a store with more
    views would hold."""
    if index == 0:
        (t, l, h, w), flip = eval_box(policy, height, width), 0.0
    else:
        rng = view_rng(policy.seed, key, index)
        t, l, h, w = rrc_box(rng, policy, height, width)
        flip = float(rng.random() < policy.flip)
    return np.array((t / height, l / width, h / height, w / width, flip), dtype=np.float32)


def sample_views(policy: ViewPolicy, key: str, height: int, width: int) -> np.ndarray:
    """(K, 5) float32: the stored views of image ``key`` of size ``height`` x ``width``."""
    return np.stack([view_at(policy, key, v, height, width) for v in range(policy.views)])


def view_box(view: np.ndarray, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """A stored view -> pixel box (top, left, height, width) and flip, for this image size."""
    t, l, h, w, flip = (float(x) for x in view)
    top, left = round(t * height), round(l * width)
    return top, left, max(1, round(h * height)), max(1, round(w * width)), flip >= 0.5


def replay_view(image: torch.Tensor, view: np.ndarray, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Crop, resize (antialiased) and flip a (3, H, W) uint8 image as the stored view says."""
    try:
        mode = INTERPOLATIONS[interpolation]
    except KeyError:
        raise KdcacheError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}") from None
    top, left, h, w, flip = view_box(view, image.shape[-2], image.shape[-1])
    out = TF.resized_crop(image, top, left, h, w, list(size), interpolation=mode, antialias=True)
    return TF.horizontal_flip(out) if flip else out
