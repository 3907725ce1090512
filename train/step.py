"""One optimisation step of distillation: forward under autocast, losses in fp32, update.

Shared by the training loop and ``kdcache bench train``, so the benchmark times the real step.
"""
from __future__ import annotations

import torch

from .losses import LossSpec, teacher_loss


def distill_step(model, images: torch.Tensor, targets: dict[str, dict], *, loss_spec: LossSpec, weights: dict[str, float],
                 optimizer, amp: str = "bf16", clip_grad: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``targets[teacher]`` as ``TeacherTargets`` gives them. Returns (total loss, per-part floats)."""
    dev = images.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp == "bf16"):
        preds = model(images)
    parts, loss = {}, 0.0
    for t, tgt in targets.items():
        with torch.autocast(dev, enabled=False):  # losses in fp32
            l = teacher_loss(preds[t], tgt, loss_spec)
        parts[f"{t}/summary"], parts[f"{t}/patch"] = l["summary"].item(), l["patch"].item()
        loss = loss + weights[t] * (loss_spec.summary_weight * l["summary"] + loss_spec.patch_weight * l["patch"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss, parts
