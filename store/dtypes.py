"""Storage dtypes: the one table of what a feature dtype is on every side.

Zarr (and numpy) have no bfloat16, so bf16 features are stored as their raw uint16 bits with
``attrs.logical_dtype = "bfloat16"``. ``STORAGE`` says, per logical dtype, which zarr dtype holds
it, its bytes per value and the torch dtype it is computed in; everything else is derived from
it: the store's ``zarr_dtype`` and ``to_float32`` (code that reads arrays directly: statistics,
quantizer samples, evaluation), extraction's cast and its hand-over of bf16 tensors as their bits
(``extract.writer``), and ``targets.decoding``'s view of the bits as bfloat16 again on the
training device. Light on purpose: torch dtypes are named here, looked up by the torch side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.errors import StoreError


@dataclass(frozen=True)
class StorageDtype:
    name: str  # the logical dtype, as --dtype and the metadata name it
    zarr: str  # the dtype of the zarr array that holds it
    itemsize: int  # bytes per value
    torch: str  # ``getattr(torch, torch)``: the dtype extraction casts to and decoding widens from

    @property
    def as_bits(self) -> bool:
        """Held as the raw bits of another dtype (bfloat16 as uint16)."""
        return self.zarr != self.name


STORAGE = {d.name: d for d in (StorageDtype("float16", "float16", 2, "float16"),
                               StorageDtype("bfloat16", "uint16", 2, "bfloat16"),
                               StorageDtype("float32", "float32", 4, "float32"))}
STORAGE_DTYPES = tuple(STORAGE)


def storage_dtype(dtype: str) -> StorageDtype:
    try:
        return STORAGE[dtype]
    except KeyError:
        raise StoreError(f"dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}") from None


def zarr_dtype(dtype: str) -> str:
    """Logical storage dtype -> the dtype of the zarr array that holds it."""
    return storage_dtype(dtype).zarr


def itemsize(dtype: str) -> int:
    return storage_dtype(dtype).itemsize


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of fp32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored feature rows of logical ``dtype`` (float16, float32, or bfloat16 bits) -> float32."""
    return bf16_bits_to_float32(rows) if storage_dtype(dtype).as_bits else np.asarray(rows, dtype=np.float32)
