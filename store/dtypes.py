"""Storage dtypes, and the one place bfloat16 is handled.

Zarr (and numpy) have no bfloat16, so bf16 features are stored as their raw uint16 bits with
``attrs.logical_dtype = "bfloat16"``. Rows cross three boundaries, each converted here:
device tensor -> numpy for the writer (``tensor_to_stored``), stored numpy row -> tensor for
the loader (``stored_to_tensor``: uint16 bits travel as int16, which torch can pin and copy),
and raw tensor -> float32 on the training device (``tensor_to_float``). ``to_float32`` is the
numpy widening for code that reads arrays directly. torch is imported lazily: reading a store
never needs it.
"""
from __future__ import annotations

import numpy as np

from .errors import StoreError

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


def torch_dtype(dtype: str):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def tensor_to_stored(t) -> np.ndarray:
    """A CPU tensor in its storage dtype -> the numpy array the store writes (bf16: uint16 bits)."""
    import torch
    if not isinstance(t, torch.Tensor):
        return t
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def stored_to_tensor(row: np.ndarray):
    """A stored numpy row -> a tensor the loader can pin and copy (bf16 bits as int16)."""
    import torch
    row = np.ascontiguousarray(row)
    if row.dtype == np.uint16:
        return torch.from_numpy(row.view(np.int16))
    return torch.from_numpy(row)


def tensor_to_float(t, dtype: str):
    """A raw row tensor from ``stored_to_tensor`` (on any device) -> float32."""
    import torch
    if dtype == "bfloat16":
        return t.view(torch.bfloat16).float()
    return t.float()
