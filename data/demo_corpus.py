"""The embedded demo corpus: real images that ship inside scikit-learn, as webdataset tars.

Handwritten digits (8x8 grey scans, 10 classes, upscaled so crops are meaningful) and crops
of scikit-learn's two sample photos (a separate class each). Deterministic: the same files
on every machine. For held-out sets: digits from ``first_digit`` on (the 1,797 scans of
``load_digits``), and crops of scikit-image's sample images (``photo_source="skimage"``, no label:
another source than the training photos; scikit-image is installed with the test and bench
extras), or crops of ``all`` of them (labelled only for scikit-learn's source).
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

SKIMAGE_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
                  "moon", "rocket", "clock", "brick", "grass", "gravel", "retina", "colorwheel", "page", "text")


def photo_images(source: str = "sklearn") -> list[np.ndarray]:
    """The (H, W, 3) uint8 photos of one source: scikit-learn's two, scikit-image's sample images, or
    ``all`` of them (for held-out crops of the same photos: another ``seed``)."""
    if source == "sklearn":
        from sklearn.datasets import load_sample_images
        return list(load_sample_images().images)  # china.jpg, flower.jpg: (427, 640, 3) uint8
    if source == "all":
        return photo_images("sklearn") + photo_images("skimage")
    if source != "skimage":
        raise ValueError(f"photo source {source!r}: expected sklearn, skimage or all")
    import skimage.data
    out = []
    for name in SKIMAGE_IMAGES:
        a = np.asarray(getattr(skimage.data, name)())
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
        out.append(a.astype(np.uint8))
    return out


def _photo_crops(n: int, rng: np.random.Generator, source: str = "sklearn"):
    photos = photo_images(source)
    for i in range(n):
        p = i % len(photos)
        img = photos[p]
        s = int(rng.integers(96, min(200, *img.shape[:2])))
        t, l = int(rng.integers(0, img.shape[0] - s)), int(rng.integers(0, img.shape[1] - s))
        yield f"photo/{p}_{i:04d}", img[t:t + s, l:l + s], (10 + p if source == "sklearn" else None), "jpg"


def _digits(n: int, size: int, first: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    for i in range(first, min(first + n, len(d.images))):
        a = (d.images[i] * (255.0 / 16.0)).astype(np.uint8)
        img = np.asarray(Image.fromarray(a, "L").resize((size, size), Image.BICUBIC))
        yield f"digit/{int(d.target[i])}_{i:04d}", img, int(d.target[i]), "png"


def build_demo_corpus(out_dir: str, *, digits: int = 192, photos: int = 64, shard_size: int = 64,
                      digit_size: int = 48, seed: int = 0, first_digit: int = 0, photo_source: str = "sklearn") -> list[str]:
    """Write ``demo-NNNNNN.tar`` shards into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = list(_digits(digits, digit_size, first_digit)) + list(_photo_crops(photos, rng, photo_source))
    order = rng.permutation(len(samples))  # mix classes across shards
    samples = [samples[i] for i in order]
    paths = []
    for s in range(0, len(samples), shard_size):
        path = os.path.join(out_dir, f"demo-{s // shard_size:06d}.tar")
        write_tar(path, samples[s:s + shard_size])
        paths.append(path)
    return paths


def write_tar(path: str, samples) -> None:
    """Write (key, image array or raw bytes, label, ext) samples as a webdataset tar."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        for key, img, label, ext in samples:
            data = img if isinstance(img, bytes) else encode(img, ext)
            _add(tar, f"{key}.{ext}", data)
            if label is not None:
                _add(tar, f"{key}.cls", str(label).encode())
    os.replace(tmp, path)


def encode(img: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format={"jpg": "JPEG", "png": "PNG"}[ext], **({"quality": 92} if ext == "jpg" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))
