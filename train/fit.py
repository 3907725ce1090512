"""``kdcache train``: build a run from its config, write its run directory, fit it.

``build_run`` checks and builds everything in memory first: the student (``models``), the source
of its targets (``train.sources``: a store and its corpus, or live teachers), the model with its
heads, the trainer; only then does rank 0 write the run directory (config, provenance, the
statistics computed, the samples skipped), so a run that cannot start leaves nothing behind.

``fit`` is the epoch loop. Single process or ``torchrun`` (DDP; gloo on CPU, nccl on CUDA; rank
and world from ``data.partition``). Every rank streams its own shards; the number of steps per
epoch is computed from the shards' sample counts as the minimum over ranks, so ranks stay in
lock-step with no extra communication. Resume continues at the same step, with the same
schedule, RNG state and data order (the interrupted epoch is replayed up to the checkpoint's
step and those batches skipped). Rank 0 shows a progress bar on stderr and makes the one
checkpoint decision per step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache.data.partition import check_remaining, epoch_split, rank_and_world, remaining_after
from kdcache.data.stream import digests_hash, record_skip
from kdcache.data.transport import release_batch, stop_workers, training_loader
from kdcache.data.walk import label_classes
from kdcache.models.device import resolve_device
from kdcache.models.student import Student, create_student, with_classifier

from .config import TrainConfig
from .metrics import MetricsLog, SkippedSamples, plot_losses, skipped_summary
from .model import DistillModel, HeadSpec
from .checkpoint import read_position
from .rundir import RunDir
from .sources import TargetSource, TrainError, open_source
from .trainer import Trainer

log = logging.getLogger("kdcache.train")


@dataclass
class Run:
    """A built run: what ``fit`` steps, what it reads, where it writes, and where it starts."""

    trainer: Trainer
    source: TargetSource
    rundir: RunDir
    epoch_steps: list[int]  # steps of every epoch at this world size (the first resumed one: of what is left of it)
    start: dict  # {epoch, step_in_epoch, global_step, remaining}: remaining, the positions a resumed epoch has left
    total_samples: int = 0  # samples in an epoch (images x samples per image)

    def loader(self) -> DataLoader:
        """The run's DataLoader; its workers persist across epochs (``SampleStream`` epochs)."""
        cfg, cuda = self.trainer.cfg, self.trainer.device.type == "cuda"
        return training_loader(self.source.dataset, batch_size=cfg.data.batch_size, workers=cfg.data.workers, pin_memory=cuda)


def epoch_total(source: TargetSource) -> int:
    """Samples in one epoch of a run: every image of every shard, times K with --view-choice all."""
    return sum(s.count for s in source.shards) * source.dataset.spec.per_image


def plan_steps(cfg: TrainConfig, total: int, world: int, epochs: range, *, resumed: tuple[int, list] | None = None,
               batchnorm: bool = False):
    """Steps of each epoch: the split's (``data.partition``), the same on every rank; a resumed
    epoch counts the positions the checkpoint left. ``batchnorm``: the student normalises by batch
    statistics, which a batch of one sample cannot give: refused here, before training starts."""
    out = []
    for e in epochs:
        remaining = resumed[1] if resumed is not None and resumed[0] == e else None
        split = epoch_split(total, world=world, workers=cfg.data.workers, batch_size=cfg.data.batch_size,
                            last_batch=cfg.data.last_batch, remaining=remaining)
        if batchnorm and split.steps and split.smallest_batch == 1:
            why = ("--batch-size 1" if cfg.data.batch_size == 1 else
                   f"the last partial batch of a DataLoader worker holds 1 sample (epoch {e}: {total} samples, world "
                   f"{world} x {max(1, cfg.data.workers)} worker(s) x batch {cfg.data.batch_size})")
            raise TrainError(f"{why}, and the student {cfg.student!r} has BatchNorm layers, which need more than one "
                             f"sample per step: a larger --batch-size" + ("" if cfg.data.batch_size == 1 else
                                                                         ", or --last-batch drop or pad"))
        out.append(split.steps)
    return out


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether a model normalises by batch statistics in training (a BatchNorm that is trained)."""
    kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    return any(isinstance(m, kinds) and m.training for m in model.modules())


def run_plan(source: TargetSource) -> dict:
    """What a run's epochs are made of, kept in RUN/plan.json: a resume checks the store (or
    corpus) still holds exactly this (shards, counts, their digests)."""
    digests = {}
    store = source.store
    for s in source.shards:
        digests[s.name] = digests_hash((store.shard_summary(s.name) or {}).get("digest", {}) if store is not None else {})
    return {"samples_per_image": source.dataset.spec.per_image,
            "shards": [[s.name, s.count, digests[s.name]] for s in source.shards]}


def check_plan(kept: dict | None, now: dict, where: str) -> None:
    """A resumed run's store must be the one it was checkpointed on: one line naming what changed."""
    if kept is None:
        return
    if kept.get("samples_per_image") != now["samples_per_image"]:
        raise TrainError(f"--resume: {where} was planned with {kept.get('samples_per_image')} samples per image, this "
                         f"run has {now['samples_per_image']} (another --view-choice, or another store)")
    old = {n: (c, d) for n, c, d in kept.get("shards", [])}
    new = {n: (c, d) for n, c, d in now["shards"]}
    for name in sorted(set(old) | set(new)):
        if name not in new:
            raise TrainError(f"--resume: shard {name} was in the run's store when it was checkpointed and is not now")
        if name not in old:
            raise TrainError(f"--resume: shard {name} is in the store now but was not when the run was checkpointed")
        if old[name][0] != new[name][0]:
            raise TrainError(f"--resume: shard {name} held {old[name][0]} samples when the run was checkpointed, "
                             f"{new[name][0]} now")
        if old[name][1] != new[name][1]:
            raise TrainError(f"--resume: shard {name}'s digests changed since the run was checkpointed (rewritten)")


def task_classes(cfg: TrainConfig, source: TargetSource) -> int:
    """0 without a task loss; else --task-classes, or the largest label of the corpus + 1."""
    if cfg.objectives.task_loss == "none":
        return 0
    if cfg.objectives.task_classes:
        return cfg.objectives.task_classes
    classes = label_classes(source.corpus) if source.corpus is not None else stored_label_classes(source)
    if classes == 0:
        where = source.corpus.spec if source.corpus is not None else source.store.url
        raise TrainError(f"--task-loss {cfg.objectives.task_loss}: {where} has no labels (webdataset cls fields or image-folder "
                         f"classes)")
    return classes


def stored_label_classes(source: TargetSource) -> int:
    """The classes of a store's labels, as extraction recorded them (``origin``): an image folder's
    class count, else the largest label + 1; 0 when it has none."""
    recorded = source.store.meta.corpus.get("classes") or []
    if recorded:
        return len(recorded)
    top = -1
    for s in source.shards:
        origin = source.store.origin(s.name)
        if origin is not None and len(origin):
            top = max(top, int(origin[:, 3].max()))
    return top + 1


def _process_group(world: int) -> None:
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def build_run(cfg: TrainConfig, *, config_file: str | None = None, evaluate: bool = False, progress: bool = True) -> Run:
    """``evaluate``: rebuild a finished run to evaluate it (``kdcache eval fidelity``): nothing is
    written into the run directory, and the weights of its last checkpoint are loaded."""
    rank, world = rank_and_world()
    _process_group(world)
    device = resolve_device(cfg.device)
    rundir = RunDir(cfg.out)
    writes = rank == 0 and not evaluate
    if writes:
        rundir.check(resume=cfg.resume, overwrite=cfg.overwrite)
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student)
    source = open_source(cfg, student, rank=rank, world=world, rundir=rundir, device=device,
                         reuse_stats=cfg.resume or evaluate, progress=progress)
    classes = task_classes(cfg, source)
    student = with_classifier(student, source.classes)  # soft labels: the student's own head, in the teachers' classes
    model = DistillModel(student.model, student.data, source.heads,
                         HeadSpec(hidden=cfg.heads.head_hidden, depth=cfg.heads.head_depth, kind=cfg.heads.head, heads=cfg.heads.head_heads,
                                  shared_adapter=cfg.heads.shared_adapter, ladder=cfg.heads.ladder,
                                  adapter_rank=cfg.heads.adapter_rank if cfg.heads.frozen_backbone else 0),
                         task_classes=classes, classify=bool(source.classes))
    total = epoch_total(source)
    plan = run_plan(source)
    start = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "remaining": None}
    if cfg.resume or evaluate:
        position = read_position(rundir)
        if position is None:
            raise TrainError(f"--resume: no checkpoint in {rundir.checkpoint}")
        start = position
        if not evaluate:
            kept = rundir.read_plan()
            check_plan(kept, plan, cfg.out)
            if kept is not None and source.store is not None:  # each shard checked against it as it is opened
                planned = {n: d for n, _, d in kept["shards"]}
                source.dataset.spec = dataclasses.replace(source.dataset.spec, shards=tuple(
                    dataclasses.replace(s, digest=planned[s.name]) for s in source.dataset.spec.shards))
            if start["epoch"] >= cfg.optimisation.epochs:
                raise TrainError(f"--resume: {cfg.out} is finished ({start['global_step']} steps, {cfg.optimisation.epochs} epochs); "
                                 f"nothing to train (pass a larger --epochs to train on)")
            if start["remaining"] is not None:
                start["remaining"] = check_remaining(start["remaining"], total)
                source.dataset.resume_at(start["epoch"], start["remaining"])
    resumed = (start["epoch"], start["remaining"]) if start["remaining"] is not None else None
    epoch_steps = [0] * start["epoch"] + plan_steps(cfg, total, world, range(start["epoch"], cfg.optimisation.epochs),
                                                    resumed=resumed, batchnorm=not evaluate and has_batchnorm(student.model))
    if not evaluate and min(epoch_steps[start["epoch"]:], default=1) == 0:
        raise TrainError(f"--last-batch drop: an epoch of {total} samples is less than one global batch (world {world} x "
                         f"--batch-size {cfg.data.batch_size}); lower --batch-size or use --last-batch partial")
    trainer = Trainer(cfg, model, source.targets, steps=start["global_step"] + sum(epoch_steps[start["epoch"]:]),
                      device=device, rank=rank, world=world)
    if cfg.resume or evaluate:
        trainer.load(rundir)
        if not evaluate:
            log.info("resuming at epoch %d, step %d%s", start["epoch"], start["global_step"],
                     "" if start["remaining"] is None else f" ({sum(e - s for s, e in start['remaining'])} samples of the "
                                                           f"epoch left)")
    if writes:
        write_run_dir(rundir, cfg, config_file, source, student, classes, plan)
    if world > 1 and not evaluate:
        # no rank writes into the run directory (its keys log, its skip records) before rank 0 has
        # prepared it: a fresh start clears what an earlier start left, a file opened before included
        torch.distributed.barrier()
    return Run(trainer=trainer, source=source, rundir=rundir, epoch_steps=epoch_steps, start=start, total_samples=total)


def provenance(cfg: TrainConfig, source: TargetSource, student: Student, classes: int) -> dict:
    """RUN/provenance.json: where the targets came from, the student as timm built it (what
    ``export`` needs to print a load line that rebuilds it), and how it was distilled."""
    return {**source.provenance, "data": cfg.data.corpus,
            "student": {"model": student.spec.model, "timm_kwargs": student.kwargs, "data": dataclasses.asdict(student.data)},
            "method": {"head": cfg.heads.head, "head_depth": cfg.heads.head_depth, "head_hidden": cfg.heads.head_hidden,
                       "shared_adapter": cfg.heads.shared_adapter, "ladder": list(cfg.heads.ladder),
                       "frozen_backbone": cfg.heads.frozen_backbone, "adapter_rank": cfg.heads.adapter_rank if cfg.heads.frozen_backbone else 0,
                       "normalize": cfg.objectives.normalize, "balance": cfg.balance.method,
                       "teacher_drop": cfg.balance.teacher_drop, "task_loss": cfg.objectives.task_loss, "task_classes": classes,
                       "logits_loss": cfg.objectives.logits_loss, "temperature": cfg.objectives.temperature, "logits_tail": cfg.objectives.logits_tail,
                       "label_loss": cfg.objectives.label_loss, "classes": source.classes, "teachers": source.teachers}}


def write_run_dir(rundir: RunDir, cfg: TrainConfig, config_file: str | None, source: TargetSource, student: Student,
                  classes: int, plan: dict) -> None:
    """Rank 0, once the run is built: the config, the provenance, what the epochs are made of, the
    statistics computed for this run, the samples and shards skipped before training."""
    rundir.prepare(resume=cfg.resume, overwrite=cfg.overwrite)
    rundir.write_config(cfg.to_json(), config_file)
    rundir.write_json("provenance.json", provenance(cfg, source, student, classes))
    if not cfg.resume:
        rundir.write_json("plan.json", plan)
    for (teacher, kind), st in source.computed_stats.items():
        rundir.save_stats(teacher, kind, st)
    for record in source.skipped:
        record_skip(rundir.skip_log, record)


def _next_batch(batches, run: Run):
    """The next batch, or None when this epoch's data ran out; under torchrun every rank agrees,
    so no rank waits in a collective for a batch another rank does not have."""
    batch = next(batches, None)
    trainer = run.trainer
    if trainer.world > 1:
        have = torch.tensor([0 if batch is None else 1], device=trainer.device if trainer.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        if not int(have.item()):
            return None
    return batch


def train(cfg: TrainConfig, *, config_file: str | None = None, progress: bool = True) -> dict:
    return fit(build_run(cfg, config_file=config_file, progress=progress), progress=progress)


def fit(run: Run, *, progress: bool = True) -> dict:
    trainer, cfg, start, rank = run.trainer, run.trainer.cfg, run.start, run.trainer.rank
    dataset = run.source.dataset
    metrics = None
    if rank == 0:
        metrics = MetricsLog(run.rundir, trainer.metric_columns(), keep_until=start["global_step"] if cfg.resume else None)
    bar = tqdm(total=start["global_step"] + sum(run.epoch_steps[start["epoch"]:]), initial=start["global_step"],
               unit="step", desc="train", disable=not progress or rank != 0, dynamic_ncols=True, mininterval=1.0)
    loader = run.loader()
    skipped_samples = SkippedSamples(run.rundir, logged=cfg.data.skip_corrupt or cfg.online.enabled)
    keys_log = KeysLog(run.rundir, rank) if cfg.data.log_keys else None
    stopped = False
    t_last, n_last = time.perf_counter(), 0
    try:
        for epoch in range(start["epoch"], cfg.optimisation.epochs):
            split = dataset.split(epoch)  # the positions of this epoch each stream delivers (what a resume left)
            remaining = dataset.remaining(epoch)
            dataset.set_epoch(epoch, following=epoch + 1 if epoch + 1 < cfg.optimisation.epochs else None)
            batches = iter(loader)
            consumed = torch.zeros(split.world * split.workers, dtype=torch.int64)  # per stream: samples delivered
            delivered = 0
            trainer.model.train()
            steps = run.epoch_steps[epoch]
            for i in range(steps):
                batch = _next_batch(batches, run)
                short = batch is None  # skipped corrupt blocks left this epoch short, on some rank
                if short:
                    log.warning("epoch %d ended after %d of %d steps: corrupt data was skipped", epoch, i, steps)
                else:
                    stream, offset = int(batch["stream"][0]), int(batch["offset"].max()) + 1
                    consumed[stream] = max(int(consumed[stream]), offset)
                    delivered += len(batch["key"])
                    if keys_log is not None:
                        keys_log.write(epoch, trainer.global_step + 1, batch["key"])
                    loss, parts = trainer.step(batch)
                    release_batch(batch)  # its worker may stack a later batch into its memory
                    n_last += len(batch["key"]) * trainer.world
                    bar.update(1)
                done_epoch = short or i == steps - 1
                step = trainer.global_step
                if not short and (step % cfg.log_every == 0 or done_epoch):
                    now = time.perf_counter()
                    row = {"step": step, "epoch": epoch, "lr": trainer.lr, "loss": loss, **parts,
                           "samples_per_s": n_last / (now - t_last), "skipped_samples": skipped_samples()}
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{row['samples_per_s']:.1f}", refresh=False)
                    if metrics is not None:
                        metrics.log(row)
                    t_last, n_last = now, 0
                stopped = bool(cfg.stop_at_step and step >= cfg.stop_at_step)
                # the one checkpoint decision (the same on every rank: each takes part in gathering the position)
                if done_epoch or stopped or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    position = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": step, "remaining": None}
                    if not done_epoch:
                        left = remaining_after(split, _all_max(consumed, trainer), remaining or [(0, run.total_samples)])
                        position = {"epoch": epoch, "step_in_epoch": i + 1, "global_step": step,
                                    "remaining": [list(r) for r in left]}
                    if rank == 0:
                        trainer.save(run.rundir, position)
                if done_epoch or stopped:
                    break
            if not stopped:
                record_epoch(run, epoch, split, remaining, _all_sum(delivered, trainer))
            del batches
            if stopped:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if keys_log is not None:
            keys_log.close()
        stop_workers(loader)
    # live teachers' forward passes (online runs; statistics included), counted by the teachers themselves
    teacher_images = sum(getattr(getattr(m, "teacher", None), "images_seen", 0) for m in trainer.targets.values())
    result = {"run": cfg.out, "steps": trainer.global_step, "stopped_early": stopped, "teacher_images": teacher_images,
              "skipped": skipped_summary(run.rundir, logged=cfg.data.skip_corrupt or cfg.online.enabled)}
    if rank == 0:
        result["loss_plot"] = plot_losses(run.rundir, trainer.teachers)
    if trainer.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def record_epoch(run: Run, epoch: int, split, remaining, delivered: int) -> None:
    """Rank 0: one line of RUN/epochs.jsonl per finished epoch: what the split planned (samples
    delivered in all, repeats included; the last partial batch dropped or padded), what the ranks
    delivered (summed), and what was skipped (corrupt data)."""
    if run.trainer.rank != 0:
        return
    run.rundir.append_jsonl(run.rundir.epoch_log, {
        "epoch": epoch, "samples": run.total_samples, "steps": split.steps, "world": split.world,
        "workers": split.workers, "batch_size": split.batch_size,
        "resumed_with": None if remaining is None else sum(e - s for s, e in remaining),
        "planned": split.planned, "delivered": delivered, "dropped": split.dropped, "padded": split.padded,
        "skipped": max(0, split.planned - delivered)})


def _all_max(values: torch.Tensor, trainer: Trainer) -> dict[int, int]:
    """Per stream, the samples delivered: each rank knows its own streams; the maximum over ranks."""
    if trainer.world > 1:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return {i: int(v) for i, v in enumerate(values.tolist())}


def _all_sum(value: int, trainer: Trainer) -> int:
    if trainer.world > 1:
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t)
        return int(t.item())
    return value


class KeysLog:
    """``--log-keys``: every key this rank delivered, one JSON line per step (RUN/keys/rank<R>.jsonl):
    an audit of the data order, and what the tests compare with the store's keys."""

    def __init__(self, rundir: RunDir, rank: int):
        self.path = rundir.keys_log(rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a")

    def write(self, epoch: int, step: int, keys) -> None:
        self._file.write(json.dumps({"epoch": epoch, "step": step, "keys": list(keys)}) + "\n")

    def close(self) -> None:
        self._file.close()
