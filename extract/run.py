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

from kdcache.data.corpus import Corpus, ReadOptions, resolve_corpus
from kdcache.data.partition import rank_and_world, rank_share
from kdcache.data.pixels import Crop
from kdcache.models.device import resolve_device
from kdcache.models.teacher import Teacher, create_teacher
from kdcache.quantize.quantizer_spec import QuantizerSpec
from kdcache.quantize.methods import require_faiss
from kdcache.store import Store, StoreError, StoreMeta, ViewPolicy, feature_path, has_teacher
from kdcache.store.inspect import shard_nbytes, write_summary
from kdcache.store.lease import Heartbeat, new_owner
from kdcache.store.meta import ORIGIN, PIXELS_JPEG, PIXELS_RAW, TOKEN_KINDS, PixelSpec, dense_path, logits_path
from kdcache.store.remote import is_url, local_path
from kdcache.store.shard_index import merge_entries
from kdcache.targets.decoding import TORCH_DTYPES
from kdcache.targets.stats import compute_stats, write_stats

from .batches import LeaseSpec, Replay, ShardBatches, ShardJob, ViewBatch
from .options import ExtractError, ExtractOptions
from .quantized import (KIND, complete_prefix, convert_complete, device_encoders, keep_float, prefix_holds_sample,
                        quantizers_to_train, sample_spec, stored_quantizers, train_quantizers, wait_for_quantizers)
from .writer import BackgroundWriter

log = logging.getLogger("kdcache.extract")
INDEX_TYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}


@dataclass
class ExtractSummary:
    shards_skipped: int = 0
    images: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    shards: list = field(default_factory=list)  # names of the shards written
    leased_elsewhere: list = field(default_factory=list)  # shards another job was writing: left to it
    teacher_images: int = 0  # images through the teachers' forward passes (every view and dense map), counted

    @property
    def shards_written(self) -> int:
        return len(self.shards)

    def merge(self, other: "ExtractSummary") -> None:
        for f in ("images", "failed", "bytes_written", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.failures += other.failures
        self.shards += other.shards
        self.leased_elsewhere += other.leased_elsewhere

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"extracted {self.images} images ({self.failed} failed) into {self.shards_written} shards "
                f"({self.shards_skipped} already complete"
                + (f", {len(self.leased_elsewhere)} left to another job" if self.leased_elsewhere else "")
                + f"), {self.bytes_written / 2**20:.1f} MiB written, {self.images_per_second:.1f} img/s")


def extract(data: str, out: str, teacher_specs: list[str], opts: ExtractOptions = ExtractOptions()) -> ExtractSummary:
    """Extract ``teacher_specs`` features of corpus ``data`` into store ``out``."""
    if not teacher_specs:
        raise ExtractError("no --teacher given")
    rank, world = rank_and_world(opts.rank, opts.world_size)
    device = resolve_device(opts.device)
    corpus = resolve_corpus(data, opts.read_options)
    teachers = _create_teachers(teacher_specs, device, opts)
    store = _open_or_create(out, corpus, teachers, opts)
    mine = rank_share(corpus.shards, rank, world)
    summary = ExtractSummary()
    prefix_written: set[str] = set()
    quantizers = stored_quantizers(store)  # a quantized teacher stays quantized in later runs
    if opts.quantize:
        # Quantized extraction, in order: (1) rank 0 writes the corpus-order prefix of shards in
        # float until it holds the training sample, (2) trains the quantizers on it (other ranks
        # wait for them), (3) every rank converts its complete float shards, (4) the rest are
        # encoded as they are written. Each step is resumable on its own.
        spec, sample = QuantizerSpec.parse(opts.quantize), sample_spec(opts)
        need = quantizers_to_train(store, teachers, spec, quantizers, keep_float=opts.keep_float)
        if need and rank == 0:
            require_faiss()  # before the float prefix is extracted: the one line says what to install
            while True:
                prefix = complete_prefix(store, corpus)
                if len(prefix) == len(corpus.shards) or prefix_holds_sample(store, need, sample, prefix):
                    break
                nxt = corpus.shards[len(prefix):len(prefix) + max(1, opts.workers)]
                log.info("quantizer training sample: extracting %s in float first", ", ".join(s.name for s in nxt))
                part = _run(store, corpus, teachers, _plan(store, teachers, nxt)[0], device, opts, rank)
                prefix_written.update(part.shards)
                summary.merge(part)
            quantizers.update(train_quantizers(store, need, spec, sample, prefix, keep_float=opts.keep_float))
        elif need:
            quantizers.update(wait_for_quantizers(store, need))
    encoders = device_encoders(quantizers, device)  # codes are computed where the features are
    convert_complete(store, [s.name for s in mine], encoders)
    jobs, skipped = _plan(store, teachers, mine)
    log.info("rank %d/%d: %d shard(s) to write, %d already complete", rank, world, len(jobs), skipped)
    summary.merge(_run(store, corpus, teachers, jobs, device, opts, rank, encoders))
    summary.shards_skipped = skipped - len(prefix_written & {s.name for s in mine})
    summary.teacher_images = sum(t.images_seen for t in teachers.values())
    if rank == 0:
        write_summary(store)  # the summary and the shard index, from every shard
        _write_stats(store, corpus)
    else:  # the shards this rank completed, into the shard index (rank 0 may have finished first)
        merge_entries(store, store.index_entries_of(summary.shards))
    return summary


def _write_stats(store: Store, corpus: Corpus) -> None:
    """Normalisation statistics for readers, once the shards they sample from are all there
    (the first shards holding the sample, or the whole corpus when it is smaller)."""
    done = len(complete_prefix(store, corpus)) == len(corpus.shards)
    leases = store.leases(new_owner(), pid=os.getpid())
    if leases.acquire(".stats") is not None:  # not a shard name: those never start with "."
        return  # another job on this store is writing them (the same numbers: the same seeded sample)
    try:
        for t in store.meta.teachers:
            for kind in TOKEN_KINDS:
                st = compute_stats(store, t, kind)
                if st["source"]["complete_sample"] or done:
                    write_stats(store, t, kind, st)
    finally:
        leases.release(".stats")


def _create_teachers(specs, device, opts) -> dict[str, Teacher]:
    teachers: dict[str, Teacher] = {}
    for s in specs:
        t = create_teacher(s, device=device, dtype=opts.dtype, codec=opts.codec, logits=opts.logits,
                           dense_scale=opts.dense_scale)
        if t.name in teachers:
            raise ExtractError(f"--teacher {t.name}: the name is given twice")
        teachers[t.name] = t
    return teachers


def _open_or_create(out: str, corpus: Corpus, teachers: dict[str, Teacher], opts: ExtractOptions) -> Store:
    first = next(iter(teachers.values())).data
    policy = ViewPolicy.for_input(first.crop_pct, first.hw, views=opts.views, seed=opts.seed)
    corpus_desc = corpus.describe()
    pixels = None
    if opts.pixels is not None:  # default: the largest teacher input, the first teacher's interpolation
        largest = max((t.input_hw for t in teachers.values()), key=lambda hw: hw[0] * hw[1])
        try:
            pixels = PixelSpec.parse(opts.pixels, default_size=largest, interpolation=first.interpolation)
        except StoreError as e:
            raise ExtractError(str(e)) from None
    if not Store.exists(out):
        _refuse_foreign_dir(out)
        from kdcache import __version__
        meta = StoreMeta(view_policy=policy, teachers={n: t.meta for n, t in teachers.items()},
                         corpus=corpus_desc, created_by=f"kdcache {__version__}", pixels=pixels)
        return Store.create(out, meta)
    store = Store.open(out, writable=True)
    old = store.meta
    if pixels is not None and old.pixels != pixels:
        raise ExtractError(f"{out}: the store keeps {'no pixels' if old.pixels is None else old.pixels.to_dict()}; this "
                           f"run asks for --pixels {pixels.to_dict()} (add pixels to an existing store with kdcache store "
                           f"pixels)")
    if (old.views, old.seed) != (opts.views, opts.seed):
        raise ExtractError(f"{out}: store was made with --views {old.views} --seed {old.seed}; this run asks for "
                           f"--views {opts.views} --seed {opts.seed} (views are never redrawn: pass the store's values)")
    if old.corpus.get("fingerprint") != corpus_desc["fingerprint"]:
        raise ExtractError(f"{out}: store was made from corpus {old.corpus.get('spec')!r} "
                           f"(fingerprint {old.corpus.get('fingerprint')}); {corpus.spec!r} is a different corpus "
                           f"(fingerprint {corpus_desc['fingerprint']})")
    # options a store written before they were recorded does not name are taken from this run
    recorded = ReadOptions.from_dict({**corpus.options.to_dict(), **old.corpus})
    if recorded != corpus.options:
        raise ExtractError(f"{out}: store was read with {recorded.to_dict()}; this run asks for "
                           f"{corpus.options.to_dict()} (pass the store's --folder-shard-size/--max-pixels/--min-size)")
    merged = dict(old.teachers)
    for n, t in teachers.items():
        if n in merged and not merged[n].same_features(t.meta):
            diff = sorted(k for k, v in t.meta.to_dict().items() if merged[n].to_dict().get(k) != v)
            raise ExtractError(f"--teacher {n}: the store's teacher {n!r} differs in {', '.join(diff)}; "
                               f"give the new teacher another name")
        merged.setdefault(n, t.meta)
    if merged != old.teachers or old.corpus != {**old.corpus, **corpus_desc}:
        store.write_meta(old.replace(teachers=merged, corpus={**old.corpus, **corpus_desc}))
    return store


STORE_ENTRIES = {"zarr.json", "shards", "quantizers", "stats", "leases", "shard_index.json"}


def _refuse_foreign_dir(out: str) -> None:
    """Never write into someone else's directory; a store another job or rank is creating right
    now (only store entries, maybe zarr's temporary metadata files) is not foreign."""
    if is_url(out) or not os.path.isdir(local_path(out)):
        return
    # zarr writes metadata through temporary files (zarr.<uuid>.partial) renamed into place
    foreign = [e for e in os.listdir(local_path(out)) if e not in STORE_ENTRIES and not e.startswith("zarr.")]
    if foreign:
        raise ExtractError(f"--out {out}: directory exists, holds {foreign[0]!r} and is not a kdcache store")


def _plan(store: Store, teachers: dict[str, Teacher], shards) -> tuple[list[ShardJob], int]:
    """What each of ``shards`` (this rank's share, no communication) needs; and how many are done."""
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
            replay = Replay(store.keys(shard.name).tolist(), store.views(shard.name), list(attrs.get("failed", [])))
            jobs.append(ShardJob(shard, need, replay=replay))
        else:
            missing = [t for t in all_teachers if t not in teachers]
            if missing:
                raise ExtractError(f"shard {shard.name} must be (re)written with every teacher of the store, "
                                   f"but this run has no --teacher for {', '.join(missing)}")
            jobs.append(ShardJob(shard, all_teachers))
    return jobs, skipped


def _run(store, corpus, teachers, jobs, device, opts, rank, encoders=None) -> ExtractSummary:
    summary = ExtractSummary()
    if not jobs:
        return summary
    groups = sorted({Crop(t.input_hw, t.meta.interpolation) for t in teachers.values()}, key=str)
    pixels = store.meta.pixels
    pixel_crop = Crop(pixels.size, pixels.interpolation) if pixels is not None else None
    if pixel_crop is not None and pixel_crop not in groups:  # (a teacher's own crop when it is the same)
        groups.append(pixel_crop)
    group_of = {n: groups.index(Crop(t.input_hw, t.meta.interpolation)) for n, t in teachers.items()}
    dense_groups = sorted({Crop(t.dense_hw, t.meta.interpolation) for t in teachers.values() if t.dense_hw}, key=str)
    for n, t in teachers.items():
        if t.dense_hw:
            group_of[f"dense/{n}"] = dense_groups.index(Crop(t.dense_hw, t.meta.interpolation))
    by_name = {j.shard.name: j for j in jobs}
    owner = new_owner()
    leases = store.leases(owner, seconds=opts.lease_seconds, pid=os.getpid())
    dataset = ShardBatches(corpus, jobs, policy=store.meta.view_policy, groups=groups, batch_size=opts.batch_size,
                           pixels=(pixels, groups.index(pixel_crop)) if pixels is not None else None,
                           on_error=opts.on_error, decode=corpus.options.decode,
                           lease=LeaseSpec(store.url, owner, opts.lease_seconds, os.getpid()), dense_groups=dense_groups)
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
    active: set[str] = set()  # shards whose lease this job holds and whose writer is not done

    def finished_shard(name):
        active.discard(name)
        leases.release(name)

    writer = BackgroundWriter(open_writer, on_finish=finished_shard)
    encode = {t: (e, keep_float(store, t)) for t, e in (encoders or {}).items()}
    heartbeat = Heartbeat(leases, active, every=opts.lease_seconds / 4)
    t0, shards_done, seen = time.perf_counter(), 0, 0
    try:
        for batch in loader:
            if batch.moved_on is not None:
                log.info("shard %s: %s; moving on", batch.shard, batch.moved_on)
                summary.leased_elsewhere.append(batch.shard)
                shards_done += 1
                continue
            active.add(batch.shard)
            job = by_name[batch.shard]
            rows, ready = _forward(batch, job, teachers, group_of, device, opts.dtype, encode, store.meta.records_origin)
            writer.put(batch.shard, rows, failed=batch.failed, last=batch.last, ready=ready)
            summary.images += len(batch)
            summary.failed += len(batch.failed)
            summary.failures += [dict(f, shard=batch.shard) for f in batch.failed]
            seen += len(batch) + len(batch.failed)
            bar.update(len(batch) + len(batch.failed))
            if batch.last:
                shards_done += 1
                if known is None and seen:  # tar shards: estimate the total from the shards seen so far
                    bar.total = int(seen + (len(jobs) - shards_done) * seen / shards_done)
                    bar.refresh()
        finished = writer.close()
    finally:
        bar.close()
        heartbeat.stop()
        writer.abandon()
        for name in list(active):  # unfinished shards stay incomplete; let the next run take them at once
            leases.release(name)
    summary.seconds = time.perf_counter() - t0
    summary.shards = [name for name, _ in finished]
    summary.bytes_written = sum(shard_nbytes(store, name) for name, _ in finished)
    return summary


def _store_rows(rows: dict, name: str, stored: torch.Tensor, encode: dict, *, dense: bool) -> None:
    """A teacher's dense maps (n, T, D) in the storage dtype as stored rows: codes with the patch
    codebooks when its patches are quantized (the floats too when kept)."""
    if name in encode:
        encoder, keep = encode[name]
        codes = encoder(stored.float().flatten(0, 1)).reshape(*stored.shape[:-1], -1)
        rows[dense_path(name, codes=True)] = codes.to("cpu", non_blocking=True)
        if not keep:
            return
    rows[dense_path(name)] = stored.to("cpu", non_blocking=True)


def _forward(batch: ViewBatch, job: ShardJob, teachers, group_of, device, dtype, encode, origin: bool):
    """Teacher features of a batch as stored rows (path -> CPU tensor in the storage dtype, or
    uint8 codes for a quantized teacher's patches: ``encode`` maps it to (encoder, keep_float))."""
    if not len(batch):
        return None, None
    n = len(batch)
    rows = {}
    if job.replay is None:
        rows["keys"] = np.asarray(batch.keys, dtype=str)
        rows["views"] = batch.views
        if origin:
            rows[ORIGIN] = batch.origin
        if batch.pixels is not None:  # every view's crop, as the worker encoded it (extract --pixels)
            rows[PIXELS_RAW if isinstance(batch.pixels, np.ndarray) else PIXELS_JPEG] = batch.pixels
    for name in job.teachers:
        crops = batch.crops[group_of[name]]  # (n, K, 3, h, w) uint8
        k = crops.shape[1]
        x = crops.flatten(0, 1).to(device, non_blocking=True)
        soft = teachers[name].meta.logits
        summary, patches, logits = teachers[name].outputs(x, logits=bool(soft))
        if soft:  # what the teacher says: its top-K logits and the log-sum-exp of all of them, per view
            values, indices = logits.topk(soft["k"], dim=-1)
            out = {"logits_values": values.to(TORCH_DTYPES[dtype]), "logits_indices": indices.to(INDEX_TYPES[soft["index_dtype"]]),
                   "logits_lse": torch.logsumexp(logits, dim=-1)}
            for part, t in out.items():
                rows[logits_path(name, part)] = t.unflatten(0, (n, k)).to("cpu", non_blocking=True)
        if f"dense/{name}" in group_of:  # the whole image at scale x the input: one patch map per image
            dense = teachers[name].dense(batch.whole[group_of[f"dense/{name}"]].to(device, non_blocking=True))
            _store_rows(rows, name, dense.to(TORCH_DTYPES[dtype]), encode, dense=True)
        # Cast on the device, copy the storage dtype (not fp32) back; non_blocking when CUDA.
        for kind, feats in (("cls", summary), ("patch", patches)):
            stored = feats.to(TORCH_DTYPES[dtype])
            if kind == KIND and name in encode:
                encoder, keep = encode[name]
                # the codes of the stored values (what `kdcache quantize` reads back), on the device,
                # between this forward and the next: only uint8 crosses to the host
                codes = encoder(stored.float()).reshape(*stored.shape[:-1], -1)
                rows[feature_path(name, kind, codes=True)] = codes.unflatten(0, (n, k)).to("cpu", non_blocking=True)
                if not keep:
                    continue
            rows[feature_path(name, kind)] = stored.unflatten(0, (n, k)).to("cpu", non_blocking=True)
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return rows, ready
