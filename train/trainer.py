"""The trainer: one object owns everything a distillation step needs; ``step(batch)`` is one step.

``Trainer`` owns the model (student + heads, ``train.model``), its DDP wrapper under torchrun,
the optimizer (AdamW), the schedule (linear warmup, cosine decay), the student's EMA, the step
policy (static weights, MGDA, teacher dropping, the task loss: ``StepPolicy``, ``train.balance``)
and the losses below. A step: the batch to the device (pinned host tensors, non-blocking
copies), the targets decoded there (``targets.decoding``, or live teachers), the forward under
autocast, the losses in fp32 in the normalised target space, the objectives weighed, backward,
clip, update, schedule, EMA. ``save``/``load`` checkpoint all of it (``train.checkpoint``).
``kdcache train``, ``train --online``, the demo and ``bench train`` all step this object.

Losses, by name: summary ``1 - cos``; patch ``alpha (1 - cos) + (1 - alpha) SmoothL1(beta)``
per token; quantized teachers with ``--predict-codes``: a 256-way cross-entropy per codebook
(MVQ-KD); the task loss: cross-entropy on the corpus labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.targets.derive import Mix, draw_mix, mix_pixels, mix_targets

from . import checkpoint
from .balance import dto_weights, min_norm_weights, representation_gram, teachers_kept
from .config import TrainConfig
from .model import DistillModel
from .rundir import RunDir

# -- losses ----------------------------------------------------------------------------------

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
    """MVQ-KD: predict each codebook's code with a 256-way cross-entropy, on (..., M * 256) logits;
    the mean over codebooks and tokens."""
    return F.cross_entropy(pred.reshape(-1, 256).float(), codes.reshape(-1).long())


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
    """{summary, patch} losses of one teacher; ``target`` holds 'summary' and 'patch' or 'codes'. A
    summary target of None (a CLS teacher's dense view: none can be derived) weighs nothing."""
    patch_kind = "codes" if "codes" in target else "patch"
    summary = (pred[0].float().sum() * 0.0 if target["summary"] is None  # in the graph, zero gradient (DDP)
               else create_loss(TARGET_LOSS["summary"])(pred[0], target["summary"], spec))
    return {"summary": summary, "patch": create_loss(TARGET_LOSS[patch_kind])(pred[1], target[patch_kind], spec)}


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


# -- how a step weighs its objectives --------------------------------------------------------

@dataclass(frozen=True)
class StepPolicy:
    """How a step weighs its objectives (teachers, and the task loss when labels are given)."""

    balance: str = "static"  # static: weights as given | mgda: min-norm weights per step | dto: task vs distillation
    teacher_drop: float = 0.0  # UNIC: P of dropping each teacher but the max-loss one
    task_weight: float = 1.0  # static weight of the task loss
    seed: int = 0
    world: int = 1

    @property
    def varies_weights(self) -> bool:
        """The objectives' weights change per step (and are logged): MGDA, DTO-KD or teacher dropping."""
        return self.balance in ("mgda", "dto") or self.teacher_drop > 0


def _mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world
    return values


def cosine_with_warmup(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def to_device(batch: dict, device: torch.device) -> dict:
    """Pinned host tensors -> device, non_blocking (the copy overlaps compute on CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- the trainer -----------------------------------------------------------------------------

class Trainer:
    """``Trainer(cfg, model, targets, steps=..., ...)``: ``targets[teacher]`` turns a batch into
    that teacher's normalised targets on the device; ``steps`` is the schedule's length."""

    def __init__(self, cfg: TrainConfig, model: DistillModel, targets: dict[str, nn.Module], *, steps: int,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.model = model.to(device)
        self.targets = {t: m.to(device) for t, m in targets.items()}
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else self.model
        trained = [p for p in self.model.parameters() if p.requires_grad]  # a frozen backbone is not
        self.optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           cosine_with_warmup(steps, min(cfg.warmup_steps, steps // 2)))
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model.student, decay=cfg.ema)
        self.loss_spec = LossSpec(alpha=cfg.alpha, beta=cfg.beta, summary_weight=cfg.summary_weight,
                                  patch_weight=cfg.patch_weight)
        self.weights = {t: float(cfg.teacher_weights.get(t, 1.0)) for t in self.targets}
        self.policy = StepPolicy(balance=cfg.balance, teacher_drop=cfg.teacher_drop, task_weight=cfg.task_weight,
                                 seed=cfg.seed, world=world)
        self.global_step = 0
        # bf16 autocast where it is fast (CUDA tensor cores); on a CPU it halves the step rate (bench train)
        self.autocast = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")

    @property
    def teachers(self) -> list[str]:
        return list(self.targets)

    @property
    def has_task(self) -> bool:
        return self.model.task_head is not None

    @property
    def soft_teachers(self) -> list[str]:
        """The teachers whose soft labels the student's classifier learns (``--logits-loss kl``)."""
        return [t for t, m in self.targets.items() if self.cfg.logits_loss != "none" and getattr(m, "gives_logits", False)]

    @property
    def uses_labels(self) -> bool:
        return self.has_task or self.cfg.label_loss != "none"

    def objectives(self) -> list[str]:
        """What a step weighs: each teacher's features, each teacher's soft labels, the labels, the task."""
        return (self.teachers + [f"logits/{t}" for t in self.soft_teachers]
                + (["labels"] if self.cfg.label_loss != "none" else []) + (["task"] if self.has_task else []))

    def metric_columns(self) -> list[str]:
        """Per-teacher losses; soft labels, labels, the task loss; each objective's weight when they vary per step."""
        cols = [f"{t}/{p}" for t in self.teachers for p in ("summary", "patch")]
        cols += [f"{t}/logits" for t in self.soft_teachers] + [o for o in ("labels", "task") if o in self.objectives()]
        if self.policy.varies_weights:
            cols += [f"weight/{o}" for o in self.objectives()]
        if self.policy.balance == "dto":
            cols.append("dto/cos")
        return cols

    def decode(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Every teacher's normalised targets for a batch already on the device."""
        return {t: decode(batch) for t, decode in self.targets.items()}

    def step(self, batch: dict) -> tuple[float, dict[str, float]]:
        """One optimisation step on a host batch from the loader: (total loss, per-part floats).
        With --cutmix/--mixup the batch is mixed on the device (seeded by seed and step): the
        student's images and any live teacher's crops (whose targets are then exact), and stored
        targets mixed the same way (``targets.derive``)."""
        batch = to_device(batch, self.device)
        mix = self.draw_mix(len(batch["image"]))
        if mix is not None:
            batch = {k: mix_pixels(v, mix) if k == "image" or k.startswith("input/") else v for k, v in batch.items()}
        targets = self.decode(batch)
        if mix is not None:
            targets = {t: tgt if self.is_live(t) else mix_targets(tgt, mix, self.targets[t].grid) for t, tgt in targets.items()}
        return self.update(batch["image"], targets, batch["label"] if self.uses_labels else None, mix=mix)

    def draw_mix(self, batch_size: int) -> Mix | None:
        cfg = self.cfg
        if not (cfg.cutmix or cfg.mixup):
            return None
        return draw_mix(batch_size, cutmix=cfg.cutmix, mixup=cfg.mixup, grid=self.targets[self.teachers[0]].grid,
                        seed=cfg.seed, step=self.global_step, device=self.device)

    def is_live(self, teacher: str) -> bool:
        """A teacher run on the batch itself (online): its targets of a mixed batch are exact."""
        return bool(getattr(self.targets[teacher], "live", False))

    def update(self, images: torch.Tensor, targets: dict[str, dict], labels: torch.Tensor | None = None, *,
               mix: Mix | None = None) -> tuple[float, dict[str, float]]:
        """Forward, losses, weights, backward, update, schedule, EMA, on device tensors (the
        student's uint8 images, decoded targets, labels with -1 for none). Under a ``mix``, label
        losses and stored soft labels are the two samples' losses weighed by the mix."""
        model, policy, dev = self.ddp, self.policy, images.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
            preds = model(images)
        parts, objectives = {}, {}
        for t, tgt in targets.items():
            with torch.autocast(dev, enabled=False):  # losses in fp32
                l = teacher_loss(preds[t], tgt, self.loss_spec)  # noqa: E741
            parts[f"{t}/summary"], parts[f"{t}/patch"] = l["summary"].item(), l["patch"].item()
            objectives[t] = self.loss_spec.summary_weight * l["summary"] + self.loss_spec.patch_weight * l["patch"]
        cfg = self.cfg
        with torch.autocast(dev, enabled=False):
            for t in self.soft_teachers:  # what the teacher says, learnt by the student's own classifier
                def soft(target, t=t):
                    return soft_label_loss(self.model.student_logits, target, temperature=cfg.temperature,
                                           tail=cfg.logits_tail)
                logits = targets[t]["logits"]
                objectives[f"logits/{t}"] = (soft(logits) if mix is None or self.is_live(t) else
                                             mixed_loss(soft, logits, mix))
                parts[f"{t}/logits"] = objectives[f"logits/{t}"].item()
            if labels is not None and cfg.label_loss != "none":
                def labelled(y):
                    return task_loss(self.model.student_logits, y, option="--label-loss",
                                     fix="the labels must be in the teacher's class space")
                objectives["labels"] = labelled(labels) if mix is None else mixed_loss(labelled, labels, mix)
                parts["labels"] = objectives["labels"].item()
            if labels is not None and self.model.task_logits is not None:
                def tasked(y):
                    return task_loss(self.model.task_logits, y)
                objectives["task"] = tasked(labels) if mix is None else mixed_loss(tasked, labels, mix)
                parts["task"] = objectives["task"].item()

        teachers = list(targets)
        kept = {t: True for t in teachers}
        if policy.teacher_drop > 0:
            mean = _mean_over_ranks(torch.stack([objectives[t].detach() for t in teachers]), policy.world)
            kept = teachers_kept(dict(zip(teachers, mean.tolist())), policy.teacher_drop, seed=policy.seed,
                                 step=self.global_step)
        active = [o for o in objectives if kept.get(o, True)]
        if policy.balance == "mgda" and len(active) > 1:
            gram = representation_gram([objectives[o] for o in active], self.model.representation, world=policy.world)
            alpha = min_norm_weights(gram).tolist()
            w = {o: len(active) * a for o, a in zip(active, alpha)}  # uniform alphas give back the plain sum
        elif policy.balance == "dto":
            w = self._dto(objectives, active, parts)
        else:
            w = {o: self._static_weight(o) for o in active}
        # dropped teachers weigh 0 (their heads stay in the graph with zero gradients: DDP needs every parameter used)
        loss = sum(w.get(o, 0.0) * objectives[o] for o in objectives)
        if policy.varies_weights:
            parts.update({f"weight/{o}": w.get(o, 0.0) for o in objectives})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model.student, step=self.global_step)
        self.global_step += 1
        return loss.item(), parts

    def _dto(self, objectives: dict, active: list[str], parts: dict) -> dict[str, float]:
        """DTO-KD: the task loss against the distillation loss (the other objectives at their static
        weights), weighed in closed form from their gradients w.r.t. the representation."""
        distill = [o for o in active if o != "task"]
        kd = sum(self._static_weight(o) * objectives[o] for o in distill)
        gram = representation_gram([objectives["task"], kd], self.model.representation, world=self.policy.world)
        a_task, a_kd, cos = dto_weights(gram)
        parts["dto/cos"] = cos
        return {"task": 2 * a_task, **{o: 2 * a_kd * self._static_weight(o) for o in distill}}

    def _static_weight(self, objective: str) -> float:
        if objective == "task":
            return self.policy.task_weight
        if objective == "labels":
            return self.cfg.label_weight
        if objective.startswith("logits/"):
            return self.cfg.logits_weight
        return self.weights[objective]

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, rundir: RunDir, position: dict) -> str:
        """Checkpoint the model, optimizer, schedule, EMA and RNG; ``position`` says where fitting
        resumes ({epoch, step_in_epoch, global_step})."""
        return checkpoint.save(rundir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                               state=position)

    def load(self, rundir: RunDir) -> dict | None:
        """Restore the last checkpoint; its position, or None when the run has none."""
        position = checkpoint.load(rundir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                   ema=self.ema)
        if position is not None:
            self.global_step = position["global_step"]
        return position
