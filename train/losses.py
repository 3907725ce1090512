"""Losses, by name: what a student's prediction pays against a target.

A feature loss is ``loss(pred, target, spec) -> scalar`` on (..., D) tensors in the normalised
target space, registered under a name with ``@feature_loss("name")``; ``--summary-loss`` and
``--patch-loss`` choose one by name (``LossSpec`` carries their parameters). Summary ``cosine``
(1 - cos); patch ``cos-smoothl1``, ``alpha (1 - cos) + (1 - alpha) SmoothL1(beta)`` per token;
quantized teachers with ``--predict-codes``: ``codes-ce``, a 256-way cross-entropy per codebook
(MVQ-KD). Beside them: the cross-entropy on labels (the task head, or the student's classifier),
the soft-label KL (Hinton et al.) of a teacher's top-K logits, and a loss under CutMix/MixUp.
Adding a loss is a function here; docs/architecture.md walks through one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError
from kdcache.targets.derive import Mix


@dataclass(frozen=True)
class LossSpec:
    alpha: float = 0.9  # patch: weight of (1 - cos); the rest goes to SmoothL1
    beta: float = 2.0  # SmoothL1 transition point
    summary_weight: float = 1.0
    patch_weight: float = 1.0


FeatureLoss = Callable[[torch.Tensor, torch.Tensor, LossSpec], torch.Tensor]
LOSSES: dict[str, FeatureLoss] = {}


def feature_loss(name: str):
    """Register ``fn(pred, target, spec) -> scalar`` under ``name`` (``--summary-loss``, ``--patch-loss``)."""
    def register(fn: FeatureLoss) -> FeatureLoss:
        LOSSES[name] = fn
        return fn
    return register


def create_loss(name: str, *, option: str = "loss") -> FeatureLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise KdcacheError(f"{option} {name!r}: expected one of {', '.join(LOSSES)}") from None


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


@feature_loss("cosine")
def cosine(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    return cosine_loss(pred, target)


@feature_loss("cos-smoothl1")
def cos_smoothl1_loss(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    return spec.alpha * cosine_loss(pred, target) + (1 - spec.alpha) * F.smooth_l1_loss(pred, target, beta=spec.beta)


@feature_loss("codes-ce")
def codes_loss(pred: torch.Tensor, codes: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """MVQ-KD: predict each codebook's code with a 256-way cross-entropy, on (..., M * 256) logits;
    the mean over codebooks and tokens."""
    return F.cross_entropy(pred.reshape(-1, 256).float(), codes.reshape(-1).long())


def task_loss(logits: torch.Tensor, labels: torch.Tensor, *, option: str = "--task-loss",
              fix: str = "raise --task-classes") -> torch.Tensor:
    """Cross-entropy over labelled samples (label >= 0); a batch with none contributes 0."""
    if not bool((labels >= 0).any()):
        return logits.float().sum() * 0.0  # keeps the classifier in the graph (DDP) with a zero gradient
    if int(labels.max()) >= logits.shape[1]:
        raise KdcacheError(f"{option}: label {int(labels.max())} in the corpus but the classifier has {logits.shape[1]} "
                           f"classes; {fix}")
    return F.cross_entropy(logits.float(), labels, ignore_index=-1)


def soft_label_loss(student_logits: torch.Tensor, target: dict, *, temperature: float = 1.0,
                    tail: str = "spread") -> torch.Tensor:
    """KL(teacher || student) of the class distributions at temperature T, times T^2 (Hinton et
    al.: the gradients keep their scale across T), averaged over the batch; 0 when they agree.

    ``target`` holds the teacher's full logits (``'full'``: a live teacher) or what a store keeps:
    its top-K logits ``'values'`` (B, K), their class ``'indices'`` and the log-sum-exp ``'lse'``
    of all C logits. Then the top-K probabilities at T=1 are exact, ``exp(values - lse)``, and so
    is the tail mass ``m = 1 - sum(top-K)``. ``tail='spread'`` gives each of the C - K other classes
    ``m / (C - K)`` (exact in total; the tail's shape is not stored), ``tail='renorm'`` drops it
    and renormalises over the top K. The distribution at T is then the T=1 one raised to 1/T and
    renormalised, which is exactly softmax(logits / T) for the stored classes."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # (B, C)
    if "full" in target:
        log_p = F.log_softmax(target["full"].float() / t, dim=-1)
        return t * t * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    values, indices, lse = target["values"].float(), target["indices"].long(), target["lse"].float()
    c, k = log_q.shape[-1], values.shape[-1]
    if int(indices.max()) >= c:
        raise KdcacheError(f"--logits-loss: the teacher's class {int(indices.max())} is beyond the student's {c} classes")
    log_q_top = log_q.gather(-1, indices)  # (B, K)
    top = (values - lse[:, None]) / t  # log p at T=1, tempered (up to the normaliser)
    if tail == "renorm" or k == c:
        log_p = F.log_softmax(top, dim=-1)
        return t * t * (log_p.exp() * (log_p - log_q_top)).sum(-1).mean()
    mass = (1 - (values - lse[:, None]).exp().sum(-1)).clamp(min=1e-12)  # the tail at T=1
    each = (torch.log(mass) - math.log(c - k)) / t  # one tail class, tempered
    log_z = torch.logsumexp(torch.cat([top, (each + math.log(c - k))[:, None]], dim=-1), dim=-1)
    log_p_top, log_p_each = top - log_z[:, None], each - log_z
    tail_log_q = log_q.sum(-1) - log_q_top.sum(-1)  # sum of the student's log q over the C - K tail classes
    kl = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1) + log_p_each.exp() * ((c - k) * log_p_each - tail_log_q)
    return t * t * kl.mean()


def mixed_loss(loss, target, mix: Mix) -> torch.Tensor:
    """A per-sample target's loss under a mix: the sample's own, weighed by ``mix.lam``, plus its
    partner's, weighed by the rest (CutMix: the pasted area)."""
    other = {k: v[mix.perm] for k, v in target.items()} if isinstance(target, dict) else target[mix.perm]
    return mix.lam * loss(target) + (1 - mix.lam) * loss(other)
