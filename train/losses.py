"""Distillation losses, by name, all computed in fp32 in the normalised target space."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.quantize.decoder import code_logits_loss
from kdcache.store import KdcacheError


@dataclass(frozen=True)
class LossSpec:
    alpha: float = 0.9  # patch: weight of (1 - cos); the rest goes to SmoothL1
    beta: float = 2.0  # SmoothL1 transition point
    summary_weight: float = 1.0
    patch_weight: float = 1.0


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def cos_smoothl1_loss(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    return spec.alpha * cosine_loss(pred, target) + (1 - spec.alpha) * F.smooth_l1_loss(pred, target, beta=spec.beta)


def codes_loss(pred: torch.Tensor, codes: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """MVQ-KD: 256-way cross-entropy per codebook on (..., M * 256) logits."""
    m = codes.shape[-1]
    return code_logits_loss(pred.reshape(*pred.shape[:-1], m, 256), codes)


# name -> loss(pred, target, spec); which one a target uses is decided by its kind
LOSSES = {
    "cosine": lambda pred, target, spec: cosine_loss(pred, target),
    "cos-smoothl1": cos_smoothl1_loss,
    "codes-ce": codes_loss,
}
TARGET_LOSS = {"summary": "cosine", "patch": "cos-smoothl1", "codes": "codes-ce"}


def create_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise KdcacheError(f"loss {name!r}: expected one of {', '.join(LOSSES)}") from None


def teacher_loss(pred: tuple, target: dict, spec: LossSpec) -> dict[str, torch.Tensor]:
    """{summary, patch} losses of one teacher; ``target`` holds 'summary' and 'patch' or 'codes'."""
    patch_kind = "codes" if "codes" in target else "patch"
    return {"summary": create_loss(TARGET_LOSS["summary"])(pred[0], target["summary"], spec),
            "patch": create_loss(TARGET_LOSS[patch_kind])(pred[1], target[patch_kind], spec)}
