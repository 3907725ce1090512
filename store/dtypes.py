"""Storage dtypes, in numpy.

Zarr (and numpy) have no bfloat16, so bf16 features are stored as their raw uint16 bits with
``attrs.logical_dtype = "bfloat16"``. The store reads and writes numpy only: ``zarr_dtype`` says
which zarr dtype holds a logical one, ``to_float32`` widens stored rows for code that reads
arrays directly (statistics, quantizer samples, evaluation). On the torch side, extraction
hands the writer bf16 tensors as their bits (``extract.writer``) and ``targets.decoding`` views
the bits as bfloat16 again on the training device.
"""
from __future__ import annotations

import numpy as np

from kdcache.errors import StoreError

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_ZARR_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}


def zarr_dtype(dtype: str) -> str:
    """Logical storage dtype -> the dtype of the zarr array that holds it."""
    try:
        return _ZARR_DTYPE[dtype]
    except KeyError:
        raise StoreError(f"dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}") from None


def itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of fp32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored feature rows of logical ``dtype`` (float16, float32, or bfloat16 bits) -> float32."""
    return bf16_bits_to_float32(rows) if dtype == "bfloat16" else np.asarray(rows, dtype=np.float32)
