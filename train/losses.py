"""Distillation losses, by name, all computed in fp32 in the normalised target space."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.quantize.decoder import code_logits_loss


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


def teacher_loss(pred: tuple, target: dict, spec: LossSpec) -> dict[str, torch.Tensor]:
    """{summary, patch} losses of one teacher; ``target`` holds 'summary' and 'patch' or 'codes'."""
    summary = cosine_loss(pred[0], target["summary"])
    if "codes" in target:
        m = target["codes"].shape[-1]
        patch = code_logits_loss(pred[1].reshape(*pred[1].shape[:-1], m, 256), target["codes"])
    else:
        patch = cos_smoothl1_loss(pred[1], target["patch"], spec)
    return {"summary": summary, "patch": patch}
