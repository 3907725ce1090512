"""``kdcache extract``: run every teacher once over a corpus and cache its features.

Plan (which shards this rank writes, with which teachers), then one pass: DataLoader workers
decode and crop, the teachers run on the device, a background thread writes. Shards already
complete are skipped, so re-running the same command resumes; shards that are complete but
lack a teacher get only that teacher, on the stored views.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache.store import KdcacheError, Store, StoreMeta, ViewPolicy
from kdcache.store.store import has_teacher
from kdcache.store.inspect import shard_nbytes, write_summary

from .batches import ON_ERROR, InputGroup, ShardBatches, ShardJob
from .corpus import FOLDER_SHARD_SIZE, Corpus, resolve_corpus
from .decode import MAX_PIXELS, MIN_SIZE, DecodeOptions
from .quantized import convert_complete, ensure_quantizers, stored_quantizers
from .teacher import Teacher, create_teacher
from .writer import BackgroundWriter

log = logging.getLogger("kdcache.extract")


class ExtractError(KdcacheError):
    pass


@dataclass(frozen=True)
class ExtractOptions:
    """Settings of one extraction run (CLI options map 1:1; None means 'library default')."""

    views: int = 1
    seed: int = 0
    dtype: str = "float16"
    codec: str = "lz4"
    device: str = "auto"
    batch_size: int = 32
    workers: int = 1
    on_error: str = "skip"
    rank: int | None = None
    world_size: int | None = None
    folder_shard_size: int = FOLDER_SHARD_SIZE
    max_pixels: int = MAX_PIXELS
    min_size: int = MIN_SIZE
    progress: bool = True
    quantize: str | None = None  # e.g. "opq:M=48": train on the first shards, store codes
    quantize_sample: int = 65536  # training tokens (plus held-out tokens for the fidelity figures)
    keep_float: bool = False  # keep the float patch arrays beside the codes
    quantize_pool: int = 4  # sample from the first shards holding >= pool x the training tokens


@dataclass
class ExtractSummary:
    shards_skipped: int = 0
    images: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    shards: list = field(default_factory=list)  # names of the shards written

    @property
    def shards_written(self) -> int:
        return len(self.shards)

    def merge(self, other: "ExtractSummary") -> None:
        for f in ("images", "failed", "bytes_written", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.failures += other.failures
        self.shards += other.shards

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"extracted {self.images} images ({self.failed} failed) into {self.shards_written} shards "
                f"({self.shards_skipped} already complete), {self.bytes_written / 2**20:.1f} MiB written, "
                f"{self.images_per_second:.1f} img/s")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def rank_and_world(opts: ExtractOptions) -> tuple[int, int]:
    """--rank/--world-size (SLURM arrays), else torchrun's RANK/WORLD_SIZE, else 0/1."""
    rank = opts.rank if opts.rank is not None else int(os.environ.get("RANK", 0))
    world = opts.world_size if opts.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ExtractError(f"--rank {rank} / --world-size {world}: need 0 <= rank < world-size")
    return rank, world


def extract(data: str, out: str, teacher_specs: list[str], opts: ExtractOptions = ExtractOptions()) -> ExtractSummary:
    """Extract ``teacher_specs`` features of corpus ``data`` into store ``out``."""
    if opts.on_error not in ON_ERROR:
        raise ExtractError(f"--on-error {opts.on_error!r}: expected one of {', '.join(ON_ERROR)}")
    if opts.views < 1:
        raise ExtractError(f"--views {opts.views}: need at least 1")
    if not teacher_specs:
        raise ExtractError("no --teacher given")
    rank, world = rank_and_world(opts)
    device = resolve_device(opts.device)
    corpus = resolve_corpus(data, folder_shard_size=opts.folder_shard_size)
    teachers = _create_teachers(teacher_specs, device, opts)
    store = _open_or_create(out, corpus, teachers, opts)
    mine = list(corpus.shards[rank::world])
    phase1: list[ExtractSummary] = []  # shards written in float to train the quantizer on
    if opts.quantize:
        ensure_quantizers(store, corpus, teachers, opts, rank=rank,
                          extract_shards=lambda shards: phase1.append(
                              _run(store, corpus, teachers, _plan(store, teachers, shards)[0], device, opts, rank)))
    encoders = stored_quantizers(store)  # a quantized teacher stays quantized in later runs
    convert_complete(store, [s.name for s in mine], encoders)
    jobs, skipped = _plan(store, teachers, mine)
    log.info("rank %d/%d: %d shard(s) to write, %d already complete", rank, world, len(jobs), skipped)
    summary = _run(store, corpus, teachers, jobs, device, opts, rank, encoders)
    for p in phase1:
        summary.merge(p)
    summary.shards_skipped = skipped - len({n for p in phase1 for n in p.shards} & {s.name for s in mine})
    if rank == 0:
        write_summary(store)
    return summary


def _create_teachers(specs, device, opts) -> dict[str, Teacher]:
    teachers: dict[str, Teacher] = {}
    for s in specs:
        t = create_teacher(s, device=device, dtype=opts.dtype, codec=opts.codec)
        if t.name in teachers:
            raise ExtractError(f"--teacher {t.name}: the name is given twice")
        teachers[t.name] = t
    return teachers


def _open_or_create(out: str, corpus: Corpus, teachers: dict[str, Teacher], opts: ExtractOptions) -> Store:
    first = next(iter(teachers.values())).meta
    h, w = first.input_size[1:]
    policy = ViewPolicy(views=opts.views, seed=opts.seed, crop_pct=first.crop_pct, aspect=h / w)
    corpus_desc = {**corpus.describe(), "decode": DecodeOptions(opts.max_pixels, opts.min_size).to_dict()}
    if not Store.exists(out):
        _refuse_foreign_dir(out)
        from kdcache import __version__
        meta = StoreMeta(view_policy=policy, teachers={n: t.meta for n, t in teachers.items()},
                         corpus=corpus_desc, created_by=f"kdcache {__version__}")
        return Store.create(out, meta)
    store = Store.open(out, writable=True)
    old = store.meta
    if (old.views, old.seed) != (opts.views, opts.seed):
        raise ExtractError(f"{out}: store was made with --views {old.views} --seed {old.seed}; this run asks for "
                           f"--views {opts.views} --seed {opts.seed} (views are never redrawn: pass the store's values)")
    if old.corpus.get("fingerprint") != corpus_desc["fingerprint"]:
        raise ExtractError(f"{out}: store was made from corpus {old.corpus.get('spec')!r} "
                           f"(fingerprint {old.corpus.get('fingerprint')}); {corpus.spec!r} is a different corpus "
                           f"(fingerprint {corpus_desc['fingerprint']})")
    merged = dict(old.teachers)
    for n, t in teachers.items():
        if n in merged and not merged[n].same_features(t.meta):
            diff = sorted(k for k, v in t.meta.to_dict().items() if merged[n].to_dict().get(k) != v)
            raise ExtractError(f"--teacher {n}: the store's teacher {n!r} differs in {', '.join(diff)}; "
                               f"give the new teacher another name")
        merged.setdefault(n, t.meta)
    if merged != old.teachers:
        store.write_meta(old.replace(teachers=merged))
    return store


def _refuse_foreign_dir(out: str) -> None:
    if "://" not in out and os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "zarr.json")):
        raise ExtractError(f"--out {out}: directory exists, is not empty and is not a kdcache store")


def _plan(store: Store, teachers: dict[str, Teacher], shards):
    """What each of ``shards`` (this rank's: ``shards[rank::world]``, no communication) needs."""
    jobs, skipped = [], 0
    all_teachers = tuple(store.meta.teachers)
    for shard in shards:
        attrs = store.shard_attrs(shard.name) or {}
        if attrs.get("complete") is True:
            have = {t for t in all_teachers if has_teacher(attrs.get("digest", {}), t)}
            need = tuple(t for t in teachers if t not in have)
            if not need:
                skipped += 1
                continue
            jobs.append(ShardJob(shard, need, replay=(store.keys(shard.name), store.views(shard.name))))
        else:
            missing = [t for t in all_teachers if t not in teachers]
            if missing:
                raise ExtractError(f"shard {shard.name} must be (re)written with every teacher of the store, "
                                   f"but this run has no --teacher for {', '.join(missing)}")
            jobs.append(ShardJob(shard, all_teachers))
    return jobs, skipped


def _to_storage(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])


def _run(store, corpus, teachers, jobs, device, opts, rank, encoders=None) -> ExtractSummary:
    summary = ExtractSummary()
    if not jobs:
        return summary
    groups = sorted({InputGroup(t.input_hw, t.meta.interpolation) for t in teachers.values()}, key=str)
    group_of = {n: groups.index(InputGroup(t.input_hw, t.meta.interpolation)) for n, t in teachers.items()}
    by_name = {j.shard.name: j for j in jobs}
    dataset = ShardBatches(corpus, jobs, policy=store.meta.view_policy, groups=groups, batch_size=opts.batch_size,
                           on_error=opts.on_error, decode=DecodeOptions(opts.max_pixels, opts.min_size))
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=None, num_workers=opts.workers, pin_memory=cuda,
                        persistent_workers=False, prefetch_factor=4 if opts.workers else None)

    def open_writer(name):
        job = by_name[name]
        metas = {t: store.meta.teachers[t] for t in job.teachers}
        return store.new_shard(name, metas) if job.replay is None else store.extend_shard(name, metas)

    known = sum(len(j.shard.members) for j in jobs) if corpus.kind == "folder" else None
    bar = tqdm(total=known, unit="img", desc=f"extract rank {rank}", position=rank, disable=not opts.progress,
               dynamic_ncols=True, mininterval=1.0)
    transform = None
    if encoders:
        from .quantized import rows_encoder
        transform = rows_encoder(store, encoders)
    writer = BackgroundWriter(open_writer, transform=transform)
    t0, shards_done, seen = time.perf_counter(), 0, 0
    try:
        for item in loader:
            if "error" in item:
                raise ExtractError(item["error"])
            job = by_name[item["shard"]]
            rows, ready, n = _forward(item, job, teachers, group_of, device, opts.dtype)
            failed = item.get("failed", [])
            writer.put(item["shard"], rows, failed=failed, last=item["last"], ready=ready)
            summary.images += n
            summary.failed += len(failed)
            summary.failures += [dict(f, shard=item["shard"]) for f in failed]
            seen += n + len(failed)
            bar.update(n + len(failed))
            if item["last"]:
                shards_done += 1
                if known is None:  # tar shards: estimate the total from the shards seen so far
                    bar.total = int(seen + (len(jobs) - shards_done) * seen / shards_done)
                    bar.refresh()
        finished = writer.close()
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.shards = [name for name, _ in finished]
    summary.bytes_written = sum(shard_nbytes(store, name) for name, _ in finished)
    return summary


def _forward(item, job: ShardJob, teachers, group_of, device, dtype):
    keys = item["keys"]
    if not keys:
        return None, None, 0
    n = len(keys)
    rows = {}
    if job.replay is None:
        rows["keys"] = np.asarray(keys, dtype=str)
        rows["views"] = item["views"]
    for name in job.teachers:
        crops = item["crops"][group_of[name]]  # (n, K, 3, h, w) uint8
        k = crops.shape[1]
        x = crops.flatten(0, 1).to(device, non_blocking=True)
        summary, patches = teachers[name].features(x)
        # Cast on the device, copy the storage dtype (not fp32) back; non_blocking when CUDA.
        rows[f"{name}/cls"] = _to_storage(summary, dtype).unflatten(0, (n, k)).to("cpu", non_blocking=True)
        rows[f"{name}/patch"] = _to_storage(patches, dtype).unflatten(0, (n, k)).to("cpu", non_blocking=True)
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return rows, ready, n
