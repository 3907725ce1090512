"""What a step learns, as parts: each objective owns its loss, its metric columns and its static weight.

An objective is anything with a ``name`` (what the balancer weighs and the weight columns are
called), ``columns`` (the parts it logs to metrics.csv), a static ``weight``, and
``loss(step) -> (scalar, {column: float}) | None`` on the step's predictions and targets (None:
nothing to learn this step, e.g. a batch without labels). ``build_objectives`` lists them in the
order a step computes them: each teacher's features, each teacher's soft labels, the labels, the
task. The trainer computes every one, lets the balancer (``train.balance``) weigh them, and
steps on the weighted sum; losses run in fp32 outside autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kdcache.targets.derive import Mix

from .config import TrainConfig
from .losses import LossSpec, codes_loss, create_loss, mixed_loss, soft_label_loss, task_loss


@dataclass
class StepOutputs:
    """What one step gives every objective: the student's predictions per teacher (summary,
    patch), the decoded targets per teacher, the labels (-1 for none; None when no objective
    needs them), the batch's mix (CutMix/MixUp) and the model (its classifier's logits)."""
    preds: dict
    targets: dict
    labels: torch.Tensor | None
    mix: Mix | None
    model: torch.nn.Module
    live: frozenset = frozenset()  # teachers run on this very batch: their targets of a mixed batch are exact


class Objective(Protocol):
    name: str
    columns: tuple[str, ...]
    weight: float

    def loss(self, step: StepOutputs) -> tuple[torch.Tensor, dict[str, float]] | None: ...


@dataclass(frozen=True)
class Features:
    """A teacher's features: the summary token's loss and the patch tokens' (or codes') loss."""
    teacher: str
    weight: float
    spec: LossSpec
    summary_loss: str = "cosine"
    patch_loss: str = "cos-smoothl1"

    @property
    def name(self) -> str:
        return self.teacher

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"{self.teacher}/summary", f"{self.teacher}/patch")

    def loss(self, step: StepOutputs):
        pred, target, spec = step.preds[self.teacher], step.targets[self.teacher], self.spec
        summary = (pred[0].float().sum() * 0.0 if target["summary"] is None  # (a CLS teacher's dense view) in the graph,
                   else create_loss(self.summary_loss, option="--summary-loss")(pred[0], target["summary"], spec))
        if "codes" in target:  # --predict-codes: a 256-way cross-entropy per codebook
            patch = codes_loss(pred[1], target["codes"], spec)
        else:
            patch = create_loss(self.patch_loss, option="--patch-loss")(pred[1], target["patch"], spec)
        value = spec.summary_weight * summary + spec.patch_weight * patch
        return value, {f"{self.teacher}/summary": summary.item(), f"{self.teacher}/patch": patch.item()}


@dataclass(frozen=True)
class SoftLabels:
    """What a teacher says, learnt by the student's own classifier (``--logits-loss kl``)."""
    teacher: str
    weight: float
    temperature: float = 1.0
    tail: str = "spread"

    @property
    def name(self) -> str:
        return f"logits/{self.teacher}"

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"{self.teacher}/logits",)

    def loss(self, step: StepOutputs):
        def soft(target):
            return soft_label_loss(step.model.student_logits, target, temperature=self.temperature, tail=self.tail)
        target = step.targets[self.teacher]["logits"]
        value = soft(target) if step.mix is None or self.teacher in step.live else mixed_loss(soft, target, step.mix)
        return value, {f"{self.teacher}/logits": value.item()}


@dataclass(frozen=True)
class Labels:
    """The corpus labels on the student's classifier, in the teacher's class space (``--label-loss ce``)."""
    weight: float
    name: str = "labels"
    columns: tuple[str, ...] = ("labels",)

    def loss(self, step: StepOutputs):
        if step.labels is None:
            return None
        value = _on_labels(step, step.model.student_logits, option="--label-loss",
                           fix="the labels must be in the teacher's class space")
        return value, {"labels": value.item()}


@dataclass(frozen=True)
class Task:
    """The corpus labels on a task head over the student's summary (``--task-loss ce``)."""
    weight: float
    name: str = "task"
    columns: tuple[str, ...] = ("task",)

    def loss(self, step: StepOutputs):
        if step.labels is None or step.model.task_logits is None:
            return None
        value = _on_labels(step, step.model.task_logits)
        return value, {"task": value.item()}


def _on_labels(step: StepOutputs, logits, **refusal):
    """Cross-entropy of ``logits`` against the corpus labels, mixed as the batch was (CutMix, MixUp)."""
    def loss(y):
        return task_loss(logits, y, **refusal)
    return loss(step.labels) if step.mix is None else mixed_loss(loss, step.labels, step.mix)


def build_objectives(cfg: TrainConfig, teachers: list[str], *, soft_teachers: list[str], task: bool) -> list[Objective]:
    """The run's objectives, in the order a step computes them."""
    o = cfg.objectives
    spec = LossSpec(alpha=o.alpha, beta=o.beta, summary_weight=o.summary_weight, patch_weight=o.patch_weight)
    create_loss(o.summary_loss, option="--summary-loss"), create_loss(o.patch_loss, option="--patch-loss")  # fail early
    out: list[Objective] = [Features(t, float(cfg.balance.teacher_weights.get(t, 1.0)), spec, o.summary_loss, o.patch_loss)
                            for t in teachers]
    out += [SoftLabels(t, o.logits_weight, o.temperature, o.logits_tail) for t in soft_teachers]
    if o.label_loss != "none":
        out.append(Labels(o.label_weight))
    if task:
        out.append(Task(o.task_weight))
    return out
