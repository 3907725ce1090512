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
import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache.data.partition import epoch_streams, rank_and_world
from kdcache.data.walk import label_classes
from kdcache.models.device import resolve_device
from kdcache.models.student import Student, create_student, with_classifier

from .config import TrainConfig
from .loader import record_skip, release_batch, training_loader
from .metrics import MetricsLog, SkippedSamples, plot_losses, skipped_summary
from .model import DistillModel, HeadSpec
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
    epoch_steps: list[int]
    start: dict  # {epoch, step_in_epoch, global_step}

    def loader(self) -> DataLoader:
        """The run's DataLoader; its workers persist across epochs (``ShardStream`` epochs)."""
        cfg, cuda = self.trainer.cfg, self.trainer.device.type == "cuda"
        return training_loader(self.source.dataset, batch_size=cfg.batch_size, workers=cfg.workers, pin_memory=cuda)


def steps_per_epoch(counts: dict[str, int], shards, cfg: TrainConfig, epoch: int, world: int) -> int:
    """Full batches every rank can deliver: each DataLoader worker batches its own shards (the
    loader's very split, ``data.partition.epoch_streams``) and drops its own last partial
    batch, so count per (rank, worker); the minimum over ranks."""
    streams = epoch_streams(shards, seed=cfg.seed, epoch=epoch, world=world, workers=cfg.workers)
    return min(sum(sum(counts[n] for n in worker) // cfg.batch_size for worker in rank) for rank in streams)


def task_classes(cfg: TrainConfig, source: TargetSource) -> int:
    """0 without a task loss; else --task-classes, or the largest label of the corpus + 1."""
    if cfg.task_loss == "none":
        return 0
    if cfg.task_classes:
        return cfg.task_classes
    classes = label_classes(source.corpus)
    if classes == 0:
        raise TrainError(f"--task-loss {cfg.task_loss}: {source.corpus.spec} has no labels (webdataset cls fields or "
                         f"image-folder classes)")
    return classes


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
                         HeadSpec(hidden=cfg.head_hidden, depth=cfg.head_depth, kind=cfg.head, heads=cfg.head_heads,
                                  shared_adapter=cfg.shared_adapter, ladder=cfg.ladder,
                                  adapter_rank=cfg.adapter_rank if cfg.frozen_backbone else 0),
                         task_classes=classes, classify=bool(source.classes))
    epoch_steps = [steps_per_epoch(source.counts, source.shards, cfg, e, world) for e in range(cfg.epochs)]
    if min(epoch_steps) == 0:
        raise TrainError(f"--batch-size {cfg.batch_size} is larger than one rank's share of the "
                         f"{'corpus' if cfg.online else 'store'} ({min(source.counts.values())} samples in the smallest "
                         f"shard); lower it")
    trainer = Trainer(cfg, model, source.targets, steps=sum(epoch_steps), device=device, rank=rank, world=world)
    start = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if cfg.resume or evaluate:
        start = trainer.load(rundir)
        if start is None:
            raise TrainError(f"--resume: no checkpoint in {rundir.checkpoint}")
        if not evaluate and start["epoch"] >= cfg.epochs:
            raise TrainError(f"--resume: {cfg.out} is finished ({start['global_step']} steps, {cfg.epochs} epochs); "
                             f"nothing to train (pass a larger --epochs to train on)")
        if not evaluate:
            log.info("resuming at epoch %d, step %d", start["epoch"], start["global_step"])
    if writes:
        write_run_dir(rundir, cfg, config_file, source, student, classes)
    return Run(trainer=trainer, source=source, rundir=rundir, epoch_steps=epoch_steps, start=start)


def provenance(cfg: TrainConfig, source: TargetSource, student: Student, classes: int) -> dict:
    """RUN/provenance.json: where the targets came from, the student as timm built it (what
    ``export`` needs to print a load line that rebuilds it), and how it was distilled."""
    return {**source.provenance, "data": cfg.data,
            "student": {"model": student.spec.model, "timm_kwargs": student.kwargs, "data": dataclasses.asdict(student.data)},
            "method": {"head": cfg.head, "head_depth": cfg.head_depth, "head_hidden": cfg.head_hidden,
                       "shared_adapter": cfg.shared_adapter, "ladder": list(cfg.ladder),
                       "frozen_backbone": cfg.frozen_backbone, "adapter_rank": cfg.adapter_rank if cfg.frozen_backbone else 0,
                       "normalize": cfg.normalize, "balance": cfg.balance,
                       "teacher_drop": cfg.teacher_drop, "task_loss": cfg.task_loss, "task_classes": classes,
                       "logits_loss": cfg.logits_loss, "temperature": cfg.temperature, "logits_tail": cfg.logits_tail,
                       "label_loss": cfg.label_loss, "classes": source.classes, "teachers": source.teachers}}


def write_run_dir(rundir: RunDir, cfg: TrainConfig, config_file: str | None, source: TargetSource, student: Student,
                  classes: int) -> None:
    """Rank 0, once the run is built: the config, the provenance, the statistics computed for this
    run, the samples and shards skipped before training."""
    rundir.prepare(resume=cfg.resume, overwrite=cfg.overwrite)
    rundir.write_config(cfg.to_json(), config_file)
    rundir.write_json("provenance.json", provenance(cfg, source, student, classes))
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
    metrics = None
    if rank == 0:
        metrics = MetricsLog(run.rundir, trainer.metric_columns(), keep_until=start["global_step"] if cfg.resume else None)
    bar = tqdm(total=sum(run.epoch_steps), initial=start["global_step"], unit="step", desc="train",
               disable=not progress or rank != 0, dynamic_ncols=True, mininterval=1.0)
    loader = run.loader()
    skipped_samples = SkippedSamples(run.rundir, logged=cfg.skip_corrupt or cfg.online)
    stopped = False
    t_last, n_last = time.perf_counter(), 0
    try:
        for epoch in range(start["epoch"], cfg.epochs):
            run.source.dataset.set_epoch(epoch, following=epoch + 1 if epoch + 1 < cfg.epochs else None)
            batches = iter(loader)
            first = start["step_in_epoch"] if epoch == start["epoch"] else 0
            for _ in range(first):  # replay the interrupted epoch's order up to the checkpoint
                release_batch(next(batches))
            trainer.model.train()
            for i in range(first, run.epoch_steps[epoch]):
                batch = _next_batch(batches, run)
                short = batch is None  # a skipped corrupt shard left this epoch short, on some rank
                if short:
                    log.warning("epoch %d ended after %d of %d steps: corrupt shards were skipped", epoch, i,
                                run.epoch_steps[epoch])
                else:
                    loss, parts = trainer.step(batch)
                    release_batch(batch)  # its worker may stack a later batch into its memory
                    n_last += cfg.batch_size * trainer.world
                    bar.update(1)
                done_epoch = short or i == run.epoch_steps[epoch] - 1
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
                # the one checkpoint decision: the end of an epoch (full or short), a stop, or every N steps
                if rank == 0 and (done_epoch or stopped or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    position = {"epoch": epoch + 1 if done_epoch else epoch, "step_in_epoch": 0 if done_epoch else i + 1,
                                "global_step": step}
                    trainer.save(run.rundir, position)
                if done_epoch or stopped:
                    break
            del batches
            if stopped:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        _stop_workers(loader)
    # live teachers' forward passes (online runs; statistics included), counted by the teachers themselves
    teacher_images = sum(getattr(getattr(m, "teacher", None), "images_seen", 0) for m in trainer.targets.values())
    result = {"run": cfg.out, "steps": trainer.global_step, "stopped_early": stopped, "teacher_images": teacher_images,
              "skipped": skipped_summary(run.rundir, logged=cfg.skip_corrupt or cfg.online)}
    if rank == 0:
        result["loss_plot"] = plot_losses(run.rundir, trainer.teachers)
    if trainer.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _stop_workers(loader: DataLoader) -> None:
    """Shut the loader's persistent workers down now. After an error, the live iterator would
    otherwise stay referenced by the traceback and its workers be reaped later, with timeouts."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        try:
            iterator._shutdown_workers()
        except RuntimeError as e:
            # a worker that dies while being shut down (after another one's error: torch's SIGCHLD
            # handler raises mid-join) must not replace the error that stopped the run
            log.debug("loader shutdown: %s", e)
    loader._iterator = None
