"""The device a stage runs on: ``auto`` is CUDA when present, else CPU."""
from __future__ import annotations

import os

import torch

from kdcache.errors import KdcacheError


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` -> a device; under torchrun ``cuda`` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdcacheError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdcacheError(f"--device {name!r}: expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and device.index is None:
        index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", index)
    return device
