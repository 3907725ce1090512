"""``kdcache train``: fit a built run (``build.build_run``) and report.

Single process or ``torchrun`` (DDP; gloo on CPU, nccl on CUDA). Every rank streams its own
shards; the number of steps per epoch is computed from the store's shard counts as the minimum
over ranks, so ranks stay in lock-step with no extra communication. Resume continues at the
same step, with the same schedule, RNG state and data order (the interrupted epoch is replayed
up to the checkpoint's step and those batches skipped). Rank 0 shows a progress bar on stderr.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from tqdm import tqdm

from . import checkpoint
from .build import Run, build_run
from .config import TrainConfig
from .loader import read_skips, to_device
from .metrics import MetricsLog, plot_losses
from .step import distill_step


log = logging.getLogger("kdcache.train")


def _next_batch(batches, run: Run):
    """The next batch, or None when this epoch's data ran out; under torchrun every rank agrees,
    so no rank waits in a collective for a batch another rank does not have."""
    batch = next(batches, None)
    if run.world > 1:
        have = torch.tensor([0 if batch is None else 1], device=run.device if run.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        if not int(have.item()):
            return None
    return batch


def skipped_summary(run: Run) -> dict:
    """Corrupt shards skipped (``--skip-corrupt``) and bad images (``--online``): unique per epoch,
    whatever resumes replayed."""
    logged = run.cfg.skip_corrupt or run.cfg.online  # (online: images that do not decode, recorded by the counting pass)
    records = {(r["epoch"], r["shard"], r.get("key")): r for r in read_skips(run.rundir.skip_log if logged else None)}
    return {"shards": sorted({r["shard"] for r in records.values()}),
            "samples": sum(r["samples_skipped"] or 0 for r in records.values()),
            "errors": sorted({f"{r['shard']}: {r['error']}" for r in records.values()})}


class SkippedSamples:
    """The running count for metrics.csv: the skip log is re-read only when it has grown (loader
    workers append to it), not on every logged step."""

    def __init__(self, run: Run):
        self.run, self.size, self.count = run, -1, 0

    def __call__(self) -> int:
        if not (self.run.cfg.skip_corrupt or self.run.cfg.online):
            return 0
        path = self.run.rundir.skip_log
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size != self.size:
            self.size, self.count = size, skipped_summary(self.run)["samples"]
        return self.count


def metric_columns(run: Run) -> list[str]:
    """Per-teacher losses; the task loss; each objective's weight when they vary per step."""
    objectives = list(run.teachers) + (["task"] if run.task_classes else [])
    cols = [f"{t}/{p}" for t in run.teachers for p in ("summary", "patch")] + (["task"] if run.task_classes else [])
    if run.policy.varies_weights:
        cols += [f"weight/{o}" for o in objectives]
    return cols


def train(cfg: TrainConfig, *, config_file: str | None = None, progress: bool = True) -> dict:
    return fit(build_run(cfg, config_file=config_file), progress=progress)


def fit(run: Run, *, progress: bool = True) -> dict:
    cfg, state = run.cfg, run.state
    metrics = None
    if run.rank == 0:
        metrics = MetricsLog(run.rundir, metric_columns(run), keep_until=state["global_step"] if cfg.resume else None)
    total = sum(run.epoch_steps)
    bar = tqdm(total=total, initial=state["global_step"], unit="step", desc="train", disable=not progress or run.rank != 0,
               dynamic_ncols=True, mininterval=1.0)
    loader = run.loader()
    skipped_samples = SkippedSamples(run)
    step, stopped = state["global_step"], False
    t_last, n_last = time.perf_counter(), 0
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            run.dataset.set_epoch(epoch)
            batches = iter(loader)
            first = state["step_in_epoch"] if epoch == state["epoch"] else 0
            for _ in range(first):  # replay the interrupted epoch's order up to the checkpoint
                next(batches)
            run.model.train()
            for i in range(first, run.epoch_steps[epoch]):
                batch = _next_batch(batches, run)
                if batch is None:  # a skipped corrupt shard left this epoch short, on some rank
                    log.warning("epoch %d ended after %d of %d steps: corrupt shards were skipped", epoch, i,
                                run.epoch_steps[epoch])
                    if run.rank == 0:
                        checkpoint.save(run.rundir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                        ema=run.ema, state={"epoch": epoch + 1, "step_in_epoch": 0, "global_step": step})
                    break
                batch = to_device(batch, run.device)
                loss, parts = distill_step(run.ddp, batch["image"], {t: run.targets[t](batch) for t in run.teachers},
                                           loss_spec=run.loss_spec, weights=run.weights, optimizer=run.optimizer,
                                           amp=cfg.amp, clip_grad=cfg.clip_grad, policy=run.policy,
                                           labels=batch["label"] if run.task_classes else None, step=step)
                run.scheduler.step()
                if run.ema is not None:
                    run.ema.update(run.model.student, step=step)
                step += 1
                n_last += cfg.batch_size * run.world
                bar.update(1)
                done_epoch = i == run.epoch_steps[epoch] - 1
                if step % cfg.log_every == 0 or done_epoch:
                    now = time.perf_counter()
                    row = {"step": step, "epoch": epoch, "lr": run.scheduler.get_last_lr()[0], "loss": loss.item(), **parts,
                           "samples_per_s": n_last / (now - t_last), "skipped_samples": skipped_samples()}
                    bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}", refresh=False)
                    if metrics is not None:
                        metrics.log(row)
                    t_last, n_last = now, 0
                next_state = {"epoch": epoch + 1 if done_epoch else epoch, "step_in_epoch": 0 if done_epoch else i + 1,
                              "global_step": step}
                stop = cfg.stop_at_step and step >= cfg.stop_at_step
                if run.rank == 0 and (done_epoch or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    checkpoint.save(run.rundir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                    ema=run.ema, state=next_state)
                if stop:
                    stopped = True
                    break
            del batches
            if stopped:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    result = {"run": cfg.out, "steps": step, "stopped_early": bool(stopped), "skipped": skipped_summary(run)}
    if run.rank == 0:
        result["loss_plot"] = plot_losses(run.rundir, run.teachers)
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result
