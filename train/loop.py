"""``kdcache train``: a student distilled from cached targets.

Single process or ``torchrun`` (DDP; gloo on CPU, nccl on CUDA). Every rank streams its own
shards; the number of steps per epoch is computed from the store's shard counts as the minimum
over ranks, so ranks stay in lock-step with no extra communication. Resume continues at the
same step, with the same schedule, RNG state and data order (the interrupted epoch is replayed
up to the checkpoint's step and those batches skipped).
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch
from torch.utils.data import DataLoader

from kdcache.extract.corpus import resolve_corpus
from kdcache.extract.decode import DecodeOptions
from kdcache.extract.run import resolve_device
from kdcache.store import KdcacheError, Store

from . import checkpoint
from .config import TrainConfig, save_config
from .loader import DistillStream, LoaderSpec, collate, epoch_shards, to_device
from .losses import LossSpec
from .metrics import MetricsLog, plot_losses
from .model import DistillModel, HeadSpec, TeacherTarget, create_student
from .step import distill_step
from .targets import TeacherTargets

log = logging.getLogger("kdcache.train")


class TrainError(KdcacheError):
    pass


def check_store_fits_corpus(store: Store, corpus, teachers) -> list[str]:
    """The shards to train on; a clear error when store and corpus do not belong together."""
    fp = store.meta.corpus.get("fingerprint")
    if fp != corpus.fingerprint():
        raise TrainError(f"{store.url} was extracted from corpus {store.meta.corpus.get('spec')!r} (fingerprint {fp}); "
                         f"--data {corpus.spec!r} is another corpus (fingerprint {corpus.fingerprint()})")
    names = [s.name for s in corpus.shards]
    missing = [n for n in names if not store.is_complete(n, teachers)]
    if missing:
        raise TrainError(f"{store.url}: {len(missing)} of {len(names)} corpus shard(s) are not complete in the store "
                         f"(first: {missing[0]}); finish `kdcache extract` first")
    return names


def steps_per_epoch(counts: dict[str, int], shards, cfg: TrainConfig, epoch: int, world: int) -> int:
    """Full batches every rank can deliver: each DataLoader worker batches its own shards and
    drops its own last partial batch, so count per (rank, worker); the minimum over ranks."""
    streams = max(1, cfg.workers)
    per_rank = []
    for r in range(world):
        mine = epoch_shards(shards, seed=cfg.seed, epoch=epoch, rank=r, world=world)
        per_rank.append(sum(sum(counts[n] for n in mine[w::streams]) // cfg.batch_size for w in range(streams)))
    return min(per_rank)


def cosine_with_warmup(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def train(cfg: TrainConfig, *, config_file: str | None = None) -> dict:
    rank, world = _distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    store = Store.open(cfg.store)
    teachers = list(cfg.teachers) or list(store.meta.teachers)
    unknown = [t for t in teachers if t not in store.meta.teachers]
    if unknown:
        raise TrainError(f"--teacher {unknown[0]}: not in {cfg.store} (teachers: {', '.join(store.meta.teachers)})")
    corpus = resolve_corpus(cfg.data)
    shards = check_store_fits_corpus(store, corpus, teachers)
    if rank == 0:
        save_config(cfg, config_file)
        _write_provenance(cfg, store)

    torch.manual_seed(cfg.seed)
    student, data, _ = create_student(cfg.student)
    tt = {t: TeacherTargets(store, t, normalize=cfg.normalize, predict_codes=cfg.predict_codes, seed=cfg.seed,
                            cache_stats=rank == 0).to(device) for t in teachers}
    model = DistillModel(student, data, [TeacherTarget(t, store.meta.teachers[t].dim, tuple(store.meta.teachers[t].grid),
                                                       tt[t].codes_m) for t in teachers],
                         HeadSpec(hidden=cfg.head_hidden, depth=cfg.head_depth)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = {n: int(store.shard_attrs(n)["count"]) for n in shards}
    epoch_steps = [steps_per_epoch(counts, shards, cfg, e, world) for e in range(cfg.epochs)]
    if min(epoch_steps) == 0:
        raise TrainError(f"--batch-size {cfg.batch_size} is larger than one rank's share of the store; lower it")
    total = sum(epoch_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, min(cfg.warmup_steps, total // 2)))
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model.student, decay=cfg.ema)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if cfg.resume:
        loaded = checkpoint.load(cfg.out, model=model, optimizer=opt, scheduler=sched, ema=ema)
        if loaded is None:
            raise TrainError(f"--resume: no checkpoint in {cfg.out}/checkpoints/last")
        state = loaded
        log.info("resuming at epoch %d, step %d", state["epoch"], state["global_step"])
    metrics = MetricsLog(cfg.out, [f"{t}/{p}" for t in teachers for p in ("summary", "patch")],
                         keep_until=state["global_step"] if cfg.resume else None) if rank == 0 else None

    spec = LoaderSpec(store_url=cfg.store, shards=tuple(shards), target_paths=tuple(p for t in teachers for p in tt[t].paths.values()),
                      input_size=tuple(data["input_size"][1:]), interpolation=data["interpolation"], view_choice=cfg.view_choice,
                      shuffle_buffer=cfg.shuffle_buffer, color_jitter=cfg.color_jitter, seed=cfg.seed,
                      decode=DecodeOptions.from_dict(store.meta.corpus.get("decode")))
    dataset = DistillStream(corpus, spec, rank=rank, world=world)
    loss_spec = LossSpec(alpha=cfg.alpha, beta=cfg.beta, summary_weight=cfg.summary_weight, patch_weight=cfg.patch_weight)
    weights = {t: float(cfg.teacher_weights.get(t, 1.0)) for t in teachers}
    cuda = device.type == "cuda"
    step = state["global_step"]
    stopped = False
    t_last, n_last = time.perf_counter(), 0
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
                                pin_memory=cuda, drop_last=True, prefetch_factor=4 if cfg.workers else None,
                                persistent_workers=False)
            batches = iter(loader)
            first = state["step_in_epoch"] if epoch == state["epoch"] else 0
            for _ in range(first):  # replay the interrupted epoch's order up to the checkpoint
                next(batches)
            model.train()
            for i in range(first, epoch_steps[epoch]):
                batch = to_device(next(batches), device)
                loss, parts = distill_step(ddp, batch["image"], {t: tt[t](batch) for t in teachers}, loss_spec=loss_spec,
                                           weights=weights, optimizer=opt, amp=cfg.amp, clip_grad=cfg.clip_grad)
                sched.step()
                if ema is not None:
                    ema.update(model.student, step=step)
                step += 1
                n_last += cfg.batch_size * world
                if metrics is not None and (step % cfg.log_every == 0 or i == epoch_steps[epoch] - 1):
                    now = time.perf_counter()
                    metrics.log({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], "loss": loss.item(), **parts,
                                 "samples_per_s": n_last / (now - t_last)})
                    t_last, n_last = now, 0
                done_epoch = i == epoch_steps[epoch] - 1
                next_state = {"epoch": epoch + 1 if done_epoch else epoch, "step_in_epoch": 0 if done_epoch else i + 1,
                              "global_step": step}
                stop = cfg.stop_at_step and step >= cfg.stop_at_step
                if rank == 0 and (done_epoch or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    checkpoint.save(cfg.out, model=model, optimizer=opt, scheduler=sched, ema=ema, state=next_state)
                if stop:
                    stopped = True
                    break
            del batches, loader
            if stopped:
                break
    finally:
        if metrics is not None:
            metrics.close()
    result = {"run": cfg.out, "steps": step, "stopped_early": bool(stopped)}
    if rank == 0:
        result["loss_plot"] = plot_losses(cfg.out, teachers)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _write_provenance(cfg: TrainConfig, store: Store) -> None:
    import json
    with open(os.path.join(cfg.out, "provenance.json"), "w") as f:
        json.dump({"store": cfg.store, "data": cfg.data, "store_meta": store.meta.to_dict()}, f, indent=2)
