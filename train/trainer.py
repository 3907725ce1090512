"""The trainer: one object owns everything a distillation step needs; ``step(batch)`` is one step.

``Trainer`` owns the model (student + heads, ``train.model``), its DDP wrapper under torchrun,
the optimizer and the schedule (``build_optimizer``, ``build_schedule``: timm's factories, or
kdcache's warmup-cosine), the student's EMA, the objectives (``train.objectives``: each
teacher's features and soft labels, the labels, the task; their losses in ``train.losses``) and
the balancer that weighs them (``train.balance``). A step: the batch to the device (pinned host
tensors, non-blocking copies), the targets decoded there (``targets.decoding``, or live
teachers), the forward under autocast, each objective's loss in fp32 in the normalised target
space, the weights, backward, clip, update, schedule, EMA. ``save``/``load`` checkpoint all of it
(``train.checkpoint``). ``kdcache train``, ``train --online``, the demo and ``bench train`` all
step this object.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.targets.derive import Mix, draw_mix, mix_pixels, mix_targets

from . import checkpoint
from .balance import create_balancer
from .config import Optimisation, TrainConfig
from .model import DistillModel
from .objectives import StepOutputs, build_objectives
from .rundir import RunDir


def cosine_with_warmup(total: int, warmup: int):
    """kdcache's schedule (``--sched warmup-cosine``): linear warmup over ``warmup`` steps, then a
    cosine from the base learning rate to 0 over the rest, as a multiplier of the base rate."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def build_optimizer(params: list, o: Optimisation) -> torch.optim.Optimizer:
    """timm's optimizer factory on the trained parameters (a list: timm's per-model weight-decay
    groups do not apply, every parameter decays as with torch's AdamW)."""
    from timm.optim import create_optimizer_v2, list_optimizers
    if o.opt.lower() not in list_optimizers():
        raise KdcacheError(f"--opt {o.opt!r}: not a timm optimizer (timm.optim.list_optimizers(): "
                           f"{', '.join(list_optimizers()[:12])}, ...)")
    extra = {"eps": o.opt_eps} if o.opt_eps else {}
    try:
        return create_optimizer_v2(params, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, **extra)
    except (ImportError, TypeError, ValueError) as e:
        raise KdcacheError(f"--opt {o.opt}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


class Schedule:
    """The learning-rate schedule stepped once per optimizer step: kdcache's warmup-cosine
    (torch's ``LambdaLR``) or one of timm's (``create_scheduler_v2``, in steps, not epochs)."""

    def __init__(self, optimizer: torch.optim.Optimizer, o: Optimisation, steps: int):
        self.optimizer, self.name = optimizer, o.sched
        warmup = min(o.warmup_steps, steps // 2)
        if o.sched == "warmup-cosine":
            self.impl = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, warmup))
            return
        from timm.scheduler import create_scheduler_v2
        self.impl, _ = create_scheduler_v2(optimizer, sched=o.sched, num_epochs=steps, warmup_epochs=warmup,
                                           warmup_lr=o.warmup_lr, min_lr=o.min_lr, warmup_prefix=True,
                                           decay_epochs=o.decay_steps or max(1, steps // 3), decay_rate=o.decay_rate,
                                           step_on_epochs=False, updates_per_epoch=1)

    def step(self, global_step: int) -> None:
        """After optimizer step ``global_step`` (0-based): the rate of the next one."""
        if self.name == "warmup-cosine":
            self.impl.step()
        else:
            self.impl.step_update(num_updates=global_step + 1)

    def state_dict(self) -> dict:
        return self.impl.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.impl.load_state_dict(state)


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
        self.optimizer = build_optimizer(trained, cfg.optimisation)
        self.scheduler = Schedule(self.optimizer, cfg.optimisation, steps)
        self.ema = None
        if cfg.optimisation.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model.student, decay=cfg.optimisation.ema)
        soft = [t for t, m in self.targets.items()
                if cfg.objectives.logits_loss != "none" and getattr(m, "gives_logits", False)]
        self.parts = build_objectives(cfg, list(self.targets), soft_teachers=soft, task=self.model.task_head is not None)
        self.static = {o.name: o.weight for o in self.parts}
        self.balancer = create_balancer(cfg.balance.method, teacher_drop=cfg.balance.teacher_drop, teachers=self.teachers,
                                        representation=lambda: self.model.representation, seed=cfg.seed, world=world)
        self.global_step = 0
        # bf16 autocast where it is fast (CUDA tensor cores); on a CPU it halves the step rate (bench train)
        amp = cfg.optimisation.amp
        self.autocast = amp == "bf16" or (amp == "auto" and device.type == "cuda")

    @property
    def teachers(self) -> list[str]:
        return list(self.targets)

    @property
    def uses_labels(self) -> bool:
        return self.model.task_head is not None or self.cfg.objectives.label_loss != "none"

    def objectives(self) -> list[str]:
        """What a step weighs: each teacher's features, each teacher's soft labels, the labels, the task."""
        return [o.name for o in self.parts]

    def metric_columns(self) -> list[str]:
        """Each objective's parts; each objective's weight when they vary per step; the balancer's own."""
        cols = [c for o in self.parts for c in o.columns]
        if self.balancer.varies:
            cols += [f"weight/{o}" for o in self.objectives()]
        return cols + list(self.balancer.columns)

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
        data = self.cfg.data
        if not (data.cutmix or data.mixup):
            return None
        return draw_mix(batch_size, cutmix=data.cutmix, mixup=data.mixup, grid=self.targets[self.teachers[0]].grid,
                        seed=self.cfg.seed, step=self.global_step, device=self.device)

    def is_live(self, teacher: str) -> bool:
        """A teacher run on the batch itself (online): its targets of a mixed batch are exact."""
        return bool(getattr(self.targets[teacher], "live", False))

    def update(self, images: torch.Tensor, targets: dict[str, dict], labels: torch.Tensor | None = None, *,
               mix: Mix | None = None) -> tuple[float, dict[str, float]]:
        """Forward, each objective's loss, the balancer's weights, backward, update, schedule, EMA,
        on device tensors (the student's uint8 images, decoded targets, labels with -1 for none).
        Under a ``mix``, label losses and stored soft labels are the two samples' losses weighed by
        the mix."""
        dev = images.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
            preds = self.ddp(images)
        outputs = StepOutputs(preds, targets, labels, mix, self.model,
                              live=frozenset(t for t in targets if self.is_live(t)))
        losses, parts = {}, {}
        with torch.autocast(dev, enabled=False):  # losses in fp32
            for objective in self.parts:
                got = objective.loss(outputs)
                if got is not None:
                    losses[objective.name], logged = got
                    parts.update(logged)
        weights, logged = self.balancer.weigh(losses, self.static, self.global_step)
        parts.update(logged)
        # an objective without a weight (a dropped teacher) weighs 0: in the graph with zero gradients (DDP)
        loss = sum(weights.get(o, 0.0) * losses[o] for o in losses)
        if self.balancer.varies:
            parts.update({f"weight/{o}": weights.get(o, 0.0) for o in losses})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optimisation.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.cfg.optimisation.clip_grad)
        self.optimizer.step()
        self.scheduler.step(self.global_step)
        if self.ema is not None:
            self.ema.update(self.model.student, step=self.global_step)
        self.global_step += 1
        return loss.item(), parts

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

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
