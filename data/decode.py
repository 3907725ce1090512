"""Bytes -> RGB uint8 image, or a recorded reason why not.

Converted where meaningful (grayscale, palette, CMYK, RGBA, 16-bit), rejected otherwise
(empty, not an image, truncated, decompression bomb, smaller than ``min_size``). The same
function decodes for the trainer, so student and teacher see the same pixels.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # an 8k x 8k photo passes, a decompression bomb does not
MIN_SIZE = 2


class BadImage(Exception):
    """The sample's bytes are not a usable image; ``str(e)`` is the reason recorded."""


@dataclass(frozen=True)
class DecodeOptions:
    """Recorded in the store (``corpus.decode``) so the trainer decodes exactly as extraction did."""

    max_pixels: int = MAX_PIXELS
    min_size: int = MIN_SIZE

    def to_dict(self) -> dict:
        return {"max_pixels": self.max_pixels, "min_size": self.min_size}

    @classmethod
    def from_dict(cls, d: dict | None) -> "DecodeOptions":
        return cls(**(d or {}))


def decode_sample(sample, opts: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """A corpus ``RawSample`` -> (H, W, 3) uint8, or BadImage (unreadable, no image field, bad bytes)."""
    if sample.error:
        raise BadImage(sample.error)
    if sample.data is None:
        raise BadImage(f"no image field (fields: {', '.join(sample.fields) or 'none'})")
    return decode_image(sample.data, opts)


def decode_image(data: bytes | None, opts: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 array, or raise BadImage with the reason."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > opts.max_pixels:
                raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {opts.max_pixels}")
            img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    if min(w, h) < opts.min_size:
        raise BadImage(f"image too small: {w}x{h} (minimum side {opts.min_size} px)")
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (or wider) single channel: PIL's convert("RGB") would clip, so rescale.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode != "RGB":
        # Alpha is dropped, as torchvision's and timm's loaders do; CMYK, L, P convert.
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable: torch.from_numpy wants to own it
