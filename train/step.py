"""One optimisation step of distillation: forward under autocast, losses in fp32, weighting
(static, MGDA, teacher dropping: ``balance``), update.

Shared by the training loop and ``kdcache bench train``, so the benchmark times the real step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.store import KdcacheError

from .balance import min_norm_weights, representation_gram, teachers_kept
from .losses import LossSpec, teacher_loss


@dataclass(frozen=True)
class StepPolicy:
    """How a step weighs its objectives (teachers, and the task loss when labels are given)."""

    balance: str = "static"  # static: weights as given | mgda: min-norm weights per step
    teacher_drop: float = 0.0  # UNIC: P of dropping each teacher but the max-loss one
    task_weight: float = 1.0  # static weight of the task loss
    seed: int = 0
    world: int = 1

    @property
    def varies_weights(self) -> bool:
        """The objectives' weights change per step (and are logged): MGDA or teacher dropping."""
        return self.balance == "mgda" or self.teacher_drop > 0


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled samples (label >= 0); a batch with none contributes 0."""
    if not bool((labels >= 0).any()):
        return logits.float().sum() * 0.0  # keeps the classifier in the graph (DDP) with a zero gradient
    if int(labels.max()) >= logits.shape[1]:
        raise KdcacheError(f"--task-loss: label {int(labels.max())} in the corpus but the task head has {logits.shape[1]} "
                           f"classes; raise --task-classes")
    return F.cross_entropy(logits.float(), labels, ignore_index=-1)


def _mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world
    return values


def distill_step(model, images: torch.Tensor, targets: dict[str, dict], *, loss_spec: LossSpec, weights: dict[str, float],
                 optimizer, amp: str = "bf16", clip_grad: float = 0.0, policy: StepPolicy = StepPolicy(),
                 labels: torch.Tensor | None = None, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """``targets[teacher]`` as ``TeacherTargets`` gives them; ``labels`` (-1 = none) for the task
    loss. Returns (total loss, per-part floats: losses, and the weights each objective got)."""
    dev = images.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp == "bf16"):
        preds = model(images)
    core = getattr(model, "module", model)  # under DDP: the DistillModel
    parts, objectives = {}, {}
    for t, tgt in targets.items():
        with torch.autocast(dev, enabled=False):  # losses in fp32
            l = teacher_loss(preds[t], tgt, loss_spec)
        parts[f"{t}/summary"], parts[f"{t}/patch"] = l["summary"].item(), l["patch"].item()
        objectives[t] = loss_spec.summary_weight * l["summary"] + loss_spec.patch_weight * l["patch"]
    if labels is not None and core.task_logits is not None:
        with torch.autocast(dev, enabled=False):
            objectives["task"] = task_loss(core.task_logits, labels)
        parts["task"] = objectives["task"].item()

    teachers = [t for t in targets]
    kept = {t: True for t in teachers}
    if policy.teacher_drop > 0:
        mean = _mean_over_ranks(torch.stack([objectives[t].detach() for t in teachers]), policy.world)
        kept = teachers_kept(dict(zip(teachers, mean.tolist())), policy.teacher_drop, seed=policy.seed, step=step)
    active = [o for o in objectives if kept.get(o, True)]
    if policy.balance == "mgda" and len(active) > 1:
        gram = representation_gram([objectives[o] for o in active], core.representation, world=policy.world)
        alpha = min_norm_weights(gram).tolist()
        w = {o: len(active) * a for o, a in zip(active, alpha)}  # uniform alphas give back the plain sum
    else:
        w = {o: (policy.task_weight if o == "task" else weights[o]) for o in active}
    # dropped teachers weigh 0 (their heads stay in the graph with zero gradients: DDP needs every parameter used)
    loss = sum(w.get(o, 0.0) * objectives[o] for o in objectives)
    if policy.varies_weights:
        parts.update({f"weight/{o}": w.get(o, 0.0) for o in objectives})
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss, parts
