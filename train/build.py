"""Building a training run: everything ``fit`` needs, from a ``TrainConfig``.

``build_run`` builds the student (``models``), then the source of its targets: a store and the
corpus it was extracted from (read back with the options the store records; checked to belong
together), or with ``--online`` the live teachers (``online``); then the per-teacher heads, the
optimizer and schedule, the loader, and restores the resume state. ``kdcache
train``, ``kdcache bench train`` and the demo all start from it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from kdcache.data.corpus import Corpus, ReadOptions, resolve_corpus
from kdcache.data.partition import epoch_streams
from kdcache.data.walk import label_classes
from kdcache.data.decode import DecodeOptions
from kdcache.models import Student, create_student, create_teacher, resolve_device
from kdcache.store import KdcacheError, Store, StoreError, ViewPolicy
from kdcache.store.errors import one_line

from . import checkpoint
from .config import TrainConfig
from .loader import DistillStream, LoaderSpec, ShardStream, collate, record_skip
from .losses import LossSpec
from .model import DistillModel, HeadSpec, TeacherTarget
from .online import OnlineStream, OnlineTargets, TeacherInput, count_samples, teacher_stats
from .rundir import RunDir
from .step import StepPolicy
from .targets import TeacherTargets

log = logging.getLogger("kdcache.train")


class TrainError(KdcacheError):
    pass


@dataclass
class Run:
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    store: Store | None  # None when online
    corpus: Corpus
    teachers: list[str]
    shards: list[str]
    student: Student
    targets: dict[str, torch.nn.Module]  # TeacherTargets, or OnlineTargets
    model: DistillModel
    ddp: torch.nn.Module  # the model as stepped: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: object | None
    epoch_steps: list[int]
    dataset: ShardStream
    loss_spec: LossSpec
    weights: dict[str, float]
    state: dict  # {epoch, step_in_epoch, global_step}: where fitting starts
    rundir: RunDir
    policy: StepPolicy  # how each step weighs teachers and the task loss
    task_classes: int = 0  # classes of the task head (0: no task loss)

    def loader(self) -> DataLoader:
        """The run's DataLoader; its workers persist across epochs (``DistillStream`` epochs)."""
        cfg, cuda = self.cfg, self.device.type == "cuda"
        return DataLoader(self.dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
                          pin_memory=cuda, drop_last=True, prefetch_factor=4 if cfg.workers else None,
                          persistent_workers=cfg.workers > 0)


def check_store_fits_corpus(store: Store, corpus: Corpus, teachers, *, skip_corrupt: bool = False):
    """(shards to train on, their counts, {bad shard: error}); a clear error when store and
    corpus do not belong together. Shard metadata is validated here: a shard whose metadata is
    invalid stops the run, or with ``skip_corrupt`` is left out and reported."""
    fp = store.meta.corpus.get("fingerprint")
    if fp != corpus.fingerprint():
        raise TrainError(f"{store.url} was extracted from corpus {store.meta.corpus.get('spec')!r} (fingerprint {fp}); "
                         f"--data {corpus.spec!r} is another corpus (fingerprint {corpus.fingerprint()})")
    names = [s.name for s in corpus.shards]
    subset = store.meta.corpus.get("subset")  # `kdcache store subset`: the store holds these shards only
    if isinstance(subset, str):
        names = [n for n in names if fnmatch.fnmatchcase(n, subset)]
    counts, bad, missing = {}, {}, []
    for n in names:
        try:
            if not store.is_complete(n, teachers):
                missing.append(n)
                continue
            counts[n] = int(store.shard_attrs(n)["count"])
        except StoreError as e:
            if not skip_corrupt:
                raise
            bad[n] = one_line(e)
    if missing:
        raise TrainError(f"{store.url}: {len(missing)} of {len(names)} corpus shard(s) are not complete in the store "
                         f"(first: {missing[0]}); finish `kdcache extract` first")
    shards = [n for n in names if n in counts]
    if not shards:
        raise TrainError(f"{store.url}: no usable shard left after skipping {len(bad)} corrupt one(s)")
    return shards, counts, bad


def steps_per_epoch(counts: dict[str, int], shards, cfg: TrainConfig, epoch: int, world: int) -> int:
    """Full batches every rank can deliver: each DataLoader worker batches its own shards (the
    loader's very split, ``data.partition.epoch_streams``) and drops its own last partial
    batch, so count per (rank, worker); the minimum over ranks."""
    streams = epoch_streams(shards, seed=cfg.seed, epoch=epoch, world=world, workers=cfg.workers)
    return min(sum(sum(counts[n] for n in worker) // cfg.batch_size for worker in rank) for rank in streams)


def task_classes(cfg: TrainConfig, corpus: Corpus) -> int:
    """--task-classes, or the largest label of the corpus + 1 (one pass over its labels)."""
    if cfg.task_classes:
        return cfg.task_classes
    classes = label_classes(corpus)
    if classes == 0:
        raise TrainError(f"--task-loss {cfg.task_loss}: {corpus.spec} has no labels (webdataset cls fields or image-folder classes)")
    return classes


def cosine_with_warmup(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


@dataclass
class TargetSource:
    """Where a run's targets come from: a store (cached) or live teachers (``online``)."""

    store: Store | None
    corpus: Corpus
    teachers: list[str]
    shards: list[str]
    counts: dict[str, int]  # samples per shard: the schedule's length
    targets: dict[str, torch.nn.Module]  # teacher -> batch -> normalised {'summary', 'patch' | 'codes'}
    shapes: list[TeacherTarget]  # what each teacher's heads must output
    dataset: ShardStream
    provenance: dict


def loader_spec(cfg: TrainConfig, student: Student, shards, *, store_url: str = "", target_paths=(), decode=None,
                skip_log: str | None = None) -> LoaderSpec:
    return LoaderSpec(store_url=store_url, shards=tuple(shards), target_paths=tuple(target_paths), input_size=student.data.hw,
                      interpolation=student.data.interpolation, view_choice=cfg.view_choice, shuffle_buffer=cfg.shuffle_buffer,
                      color_jitter=cfg.color_jitter, seed=cfg.seed, workers=cfg.workers, decode=decode or DecodeOptions(),
                      skip_log=skip_log)


def cached_source(cfg: TrainConfig, student: Student, *, rank: int, world: int, rundir: RunDir, writes: bool,
                  device: torch.device) -> TargetSource:
    store = Store.open(cfg.store)
    teachers = list(cfg.teachers) or list(store.meta.teachers)
    unknown = [t for t in teachers if t not in store.meta.teachers]
    if unknown:
        raise TrainError(f"--teacher {unknown[0]}: not in {cfg.store} (teachers: {', '.join(store.meta.teachers)})")
    corpus = resolve_corpus(cfg.data, ReadOptions.from_dict(store.meta.corpus))
    shards, counts, bad = check_store_fits_corpus(store, corpus, teachers, skip_corrupt=cfg.skip_corrupt)
    if writes:
        for n, error in bad.items():
            record_skip(rundir.skip_log, {"epoch": None, "shard": n, "error": error, "samples_skipped": None})
    targets = {t: TeacherTargets(store, t, normalize=cfg.normalize, predict_codes=cfg.predict_codes, shards=shards, rundir=rundir,
                                 write_stats=writes, skip_corrupt=cfg.skip_corrupt).to(device) for t in teachers}
    metas = store.meta.teachers
    shapes = [TeacherTarget(t, metas[t].dim, tuple(metas[t].grid), targets[t].codes_m) for t in teachers]
    spec = loader_spec(cfg, student, shards, store_url=cfg.store, decode=corpus.options.decode,
                       target_paths=[p for t in teachers for p in targets[t].paths.values()],
                       skip_log=rundir.skip_log if cfg.skip_corrupt else None)
    return TargetSource(store=store, corpus=corpus, teachers=teachers, shards=shards, counts=counts, targets=targets,
                        shapes=shapes, dataset=DistillStream(corpus, spec, rank=rank, world=world),
                        provenance={"store": cfg.store, "store_meta": store.meta.to_dict()})


def online_source(cfg: TrainConfig, student: Student, *, rank: int, world: int, rundir: RunDir, writes: bool,
                  device: torch.device, progress: bool = True) -> TargetSource:
    corpus = resolve_corpus(cfg.data, ReadOptions())
    with torch.random.fork_rng(devices=[]):  # building teachers must not move the student's and heads' init
        teachers = [create_teacher(spec, device=device) for spec in cfg.teachers]
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise TrainError(f"--teacher: two teachers named {next(n for n in names if names.count(n) > 1)!r}")
    shards = [s.name for s in corpus.shards]
    counts = count_samples(corpus, shards, corpus.options.decode, skip_log=rundir.skip_log if writes else None,
                           progress=progress and writes)
    first = teachers[0].data
    policy = ViewPolicy(views=1, seed=cfg.seed, crop_pct=first.crop_pct, aspect=first.hw[0] / first.hw[1])
    inputs = tuple(TeacherInput(t.name, t.input_hw, t.meta.interpolation) for t in teachers)
    dataset = OnlineStream(corpus, loader_spec(cfg, student, shards, decode=corpus.options.decode), policy, inputs,
                           rank=rank, world=world)
    targets = {t.name: OnlineTargets(t, cfg.normalize, teacher_stats(t, dataset, normalize=cfg.normalize,
                                                                    images=cfg.online_stats_images, seed=cfg.seed,
                                                                    rundir=rundir, write=writes)).to(device)
               for t in teachers}
    shapes = [TeacherTarget(t.name, t.meta.dim, tuple(t.meta.grid)) for t in teachers]
    return TargetSource(store=None, corpus=corpus, teachers=names, shards=shards, counts=counts, targets=targets, shapes=shapes,
                        dataset=dataset, provenance={"online": True, "view_policy": policy.to_dict(),
                                                     "teachers": {t.name: t.meta.to_dict() for t in teachers}})


def build_run(cfg: TrainConfig, *, config_file: str | None = None, evaluate: bool = False) -> Run:
    """``evaluate``: rebuild a finished run to evaluate it (``kdcache eval fidelity``): nothing is
    written into the run directory, and the weights of its last checkpoint are loaded."""
    rank, world = _distributed()
    device = resolve_device(cfg.device)
    rundir = RunDir(cfg.out)
    writes = rank == 0 and not evaluate
    if writes:
        rundir.prepare(resume=cfg.resume, overwrite=cfg.overwrite)
        rundir.write_config(cfg.to_json(), config_file)
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student)
    make_source = online_source if cfg.online else cached_source
    src = make_source(cfg, student, rank=rank, world=world, rundir=rundir, writes=writes, device=device)
    classes = task_classes(cfg, src.corpus) if cfg.task_loss != "none" else 0
    if writes:  # what export needs to print a load line that rebuilds exactly this student; how it was distilled
        rundir.write_json("provenance.json", {**src.provenance, "data": cfg.data,
                                              "student": {"model": student.spec.model, "timm_kwargs": student.kwargs,
                                                          "data": dataclasses.asdict(student.data)},
                                              "method": {"head": cfg.head, "head_depth": cfg.head_depth,
                                                         "head_hidden": cfg.head_hidden, "shared_adapter": cfg.shared_adapter,
                                                         "normalize": cfg.normalize, "balance": cfg.balance,
                                                         "teacher_drop": cfg.teacher_drop, "task_loss": cfg.task_loss,
                                                         "task_classes": classes, "teachers": src.teachers}})
    model = DistillModel(student.model, student.data, src.shapes,
                         HeadSpec(hidden=cfg.head_hidden, depth=cfg.head_depth, kind=cfg.head, heads=cfg.head_heads,
                                  shared_adapter=cfg.shared_adapter), task_classes=classes).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epoch_steps = [steps_per_epoch(src.counts, src.shards, cfg, e, world) for e in range(cfg.epochs)]
    if min(epoch_steps) == 0:
        raise TrainError(f"--batch-size {cfg.batch_size} is larger than one rank's share of the "
                         f"{'corpus' if cfg.online else 'store'} ({min(src.counts.values())} samples in the smallest shard); "
                         f"lower it")
    total = sum(epoch_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, min(cfg.warmup_steps, total // 2)))
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model.student, decay=cfg.ema)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if cfg.resume or evaluate:
        state = checkpoint.load(rundir, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
        if state is None:
            raise TrainError(f"--resume: no checkpoint in {rundir.checkpoint}")
        log.info("resuming at epoch %d, step %d", state["epoch"], state["global_step"])
    return Run(cfg=cfg, rank=rank, world=world, device=device, store=src.store, corpus=src.corpus, teachers=src.teachers,
               shards=src.shards, student=student, targets=src.targets, model=model, ddp=ddp, optimizer=optimizer,
               scheduler=scheduler, ema=ema, epoch_steps=epoch_steps, dataset=src.dataset,
               loss_spec=LossSpec(alpha=cfg.alpha, beta=cfg.beta, summary_weight=cfg.summary_weight, patch_weight=cfg.patch_weight),
               weights={t: float(cfg.teacher_weights.get(t, 1.0)) for t in src.teachers}, state=state, rundir=rundir,
               policy=StepPolicy(balance=cfg.balance, teacher_drop=cfg.teacher_drop, task_weight=cfg.task_weight,
                                 seed=cfg.seed, world=world), task_classes=classes)
