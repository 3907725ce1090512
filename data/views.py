"""Which box of an image a view is: the seeded contract between extraction and training.

A view is ``(top, left, height, width, flip)`` with the box in fractions of the
decoded image's height and width, so it replays at whatever resolution the image is decoded.
View 0 is the teacher's eval view (the centred ``crop_pct`` box); views 1..K-1 are
RandomResizedCrop + horizontal flip from a generator seeded by ``(seed, key, view)``, so the
same parameters come back from the key and image size alone, on any machine. Indices beyond K
are the fresh views of online distillation: the sequence a store with more views would hold.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from kdcache.store.meta import ViewPolicy


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
    RandomResizedCrop + flip from ``view_rng(seed, key, index)``."""
    if index == 0:
        (t, l, h, w), flip = eval_box(policy, height, width), 0.0
    else:
        rng = view_rng(policy.seed, key, index)
        t, l, h, w = rrc_box(rng, policy, height, width)
        flip = float(rng.random() < policy.flip)
    return np.array((t / height, l / width, h / height, w / width, flip), dtype=np.float32)


def sub_view(view: np.ndarray, seed: int, key: str, epoch: int, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """A random box inside a stored view (``train --sub-views``): its share of the view's area
    uniform in [min_area, 1], aspect ratio in [3/4, 4/3], seeded by (seed, key, epoch). Returns
    the student's view (5,) in image fractions (the stored view's flip kept) and the box (4,) in
    fractions of the stored view's crop as the teacher saw it (mirrored when the view is flipped),
    which is where its patch targets are cut from the stored grid."""
    t, l, h, w, flip = (float(x) for x in view)
    rng = view_rng(seed, f"{key}\0sub-view", epoch)
    area = rng.uniform(min_area, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    rh, rw = min(1.0, math.sqrt(area / ratio)), min(1.0, math.sqrt(area * ratio))
    rt, rl = rng.uniform(0.0, 1.0 - rh), rng.uniform(0.0, 1.0 - rw)
    student = np.array((t + rt * h, l + rl * w, rh * h, rw * w, flip), dtype=np.float32)
    box = np.array((rt, 1.0 - rl - rw if flip >= 0.5 else rl, rh, rw), dtype=np.float32)
    return student, box


def sample_views(policy: ViewPolicy, key: str, height: int, width: int) -> np.ndarray:
    """(K, 5) float32: the stored views of image ``key`` of size ``height`` x ``width``."""
    return np.stack([view_at(policy, key, v, height, width) for v in range(policy.views)])


WHOLE_IMAGE = np.array([[0.0, 0.0, 1.0, 1.0, 0.0]], dtype=np.float32)  # the whole image, unflipped, as one view


def view_box(view: np.ndarray, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """A stored view -> pixel box (top, left, height, width) and flip, for this image size."""
    t, l, h, w, flip = (float(x) for x in view)
    top, left = round(t * height), round(l * width)
    return top, left, max(1, round(h * height)), max(1, round(w * width)), flip >= 0.5
