"""Where a run's targets come from: a store (cached) or live teachers (``--online``).

A ``TargetSource`` is everything the trainer and the epoch loop need from that choice: the
corpus, the teachers and what their heads must output, the shards and their sample counts (the
schedule's length), the stream of samples, and per teacher the module that turns a batch into
normalised targets on the device (``targets.decoding.TargetDecoder`` for stored bytes,
``online.LiveTargets`` for live teachers). Building a source reads, and never writes: the
statistics it computed and the samples it skipped come back with it, for the caller to keep in
the run directory once the whole run has been built.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from kdcache.data.corpus import Corpus, DecodeOptions, ReadOptions, resolve_corpus
from kdcache.data.partition import ShardRows
from kdcache.data.pixels import Crop
from kdcache.data.stream import SampleStream, StreamSpec
from kdcache.errors import KdcacheError, StoreError, one_line
from kdcache.models.student import Student
from kdcache.models.teacher import create_teacher
from kdcache.store import Store, ViewPolicy
from kdcache.store.meta import TOKEN_KINDS, has_pixels
from kdcache.targets.decoding import TargetDecoder, stored_codebooks
from kdcache.targets.normalize import needs_stats
from kdcache.targets.stats import reader_stats

from .config import TrainConfig
from .model import TeacherTarget
from .online import ONLINE_BLOCK, LiveTargets, count_samples, teacher_input, teacher_stats
from .rundir import RunDir


class TrainError(KdcacheError):
    pass


@dataclass
class TargetSource:
    """A run's targets, as ``open_source`` found them."""

    corpus: Corpus | None  # None: a run from the store alone (its pixels)
    teachers: list[str]
    shards: list[ShardRows]  # the shards the epochs go through: name, images, rows per block
    targets: dict[str, nn.Module]  # teacher -> (batch -> normalised {'summary', 'patch' | 'codes'})
    heads: list[TeacherTarget]  # what each teacher's heads must output
    dataset: SampleStream
    provenance: dict  # where the targets came from, for RUN/provenance.json
    store: Store | None = None  # None when online
    classes: int = 0  # the teachers' class count, when the student learns their soft labels (--logits-loss)
    computed_stats: dict = field(default_factory=dict)  # (teacher, kind) -> statistics computed here, to keep
    skipped: list[dict] = field(default_factory=list)  # records for RUN/skipped.jsonl


def stream_spec(cfg: TrainConfig, student: Student, shards, *, views: str = "stored", stored_views: int = 1,
                policy: ViewPolicy | None = None, store_url: str | None = None, target_paths=(), decode=None,
                skip_log: str | None = None, crops=(), source: str = "corpus") -> StreamSpec:
    """The run's stream: its shards (name, count, rows per block), the student's crop first."""
    return StreamSpec(shards=tuple(shards), crops=(("image", Crop(student.data.hw, student.data.interpolation)), *crops),
                      decode=decode or DecodeOptions(), views=views, view_choice=cfg.data.view_choice, stored_views=stored_views,
                      policy=policy, seed=cfg.seed, window=cfg.data.shuffle_buffer, batch_size=cfg.data.batch_size,
                      last_batch=cfg.data.last_batch, workers=cfg.data.workers, store_url=store_url, target_paths=tuple(target_paths),
                      skip_log=skip_log, color_jitter=cfg.data.color_jitter, sub_views=cfg.data.sub_views,
                      dense_views=cfg.data.dense_views, source=source)


def check_derived_views(cfg: TrainConfig, store: Store, teachers: list[str]) -> None:
    """What --sub-views, --cutmix/--mixup and --dense-views need of the store's teachers, or one line."""
    for t in teachers:
        meta = store.meta.teachers[t]
        if (cfg.data.sub_views or cfg.data.cutmix or cfg.data.dense_views) and meta.tokens < 2:
            option = "--sub-views" if cfg.data.sub_views else "--cutmix" if cfg.data.cutmix else "--dense-views"
            raise TrainError(f"{option}: teacher {t} of {store.url} has a {meta.grid[0]}x{meta.grid[1]} patch grid; "
                             f"boxes need a grid to cut (a teacher whose patch targets have at least 2 tokens)")
        if cfg.data.dense_views and not meta.dense:
            raise TrainError(f"--dense-views: teacher {t} of {store.url} has no dense maps (extract it with --dense-scale S)")


def open_source(cfg: TrainConfig, student: Student, *, rank: int, world: int, rundir: RunDir, device: torch.device,
                reuse_stats: bool = False, progress: bool = True) -> TargetSource:
    """The run's targets; ``rundir`` is only read: with ``reuse_stats`` (resuming, evaluating) the
    statistics the run kept are used while still fresh, so it normalises exactly as before."""
    kept = rundir if reuse_stats else None
    if cfg.online.enabled:
        return online_source(cfg, student, rank=rank, world=world, kept=kept, device=device, progress=progress)
    return cached_source(cfg, student, rank=rank, world=world, kept=kept, skip_log=rundir.skip_log, device=device)


def check_store_fits_corpus(store: Store, corpus: Corpus, teachers, *, skip_corrupt: bool = False):
    """(the shards to train on as the plan sees them, {bad shard: error}); a clear error when store and
    corpus do not belong together. Planned from the shard index where it has the shard (no
    request per shard: 10,000 shards cost 7 s locally when each shard's metadata was read here);
    a shard the index does not name is asked itself, and a shard whose metadata is invalid stops
    the run, or with ``skip_corrupt`` is left out and reported. The loader checks every shard's
    own metadata when it reads it (``data.stream``)."""
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
            counts[n] = int(store.shard_summary(n)["count"])
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
    return [ShardRows(n, counts[n], store.shard_block(n)) for n in shards], bad


def store_shards(store: Store, teachers, *, skip_corrupt: bool = False):
    """(the store's complete shards holding ``teachers`` as the plan sees them, {bad shard: error}):
    a run from the store alone (its pixels), planned from the shard index where it has the shard."""
    counts, bad = {}, {}
    names = store.shard_names()
    for n in names:
        try:
            if store.is_complete(n, teachers):
                counts[n] = int(store.shard_summary(n)["count"])
        except StoreError as e:
            if not skip_corrupt:
                raise
            bad[n] = one_line(e)
    if not counts:
        raise TrainError(f"{store.url}: no complete shard holds every teacher of the run")
    return [ShardRows(n, counts[n], store.shard_block(n)) for n in names if n in counts], bad


def image_source(cfg: TrainConfig, store: Store, student: Student, shards) -> str:
    """Where the student's images come from: ``pixels`` (the crops the store keeps of every view,
    ``extract --pixels``) or ``corpus`` (each view cut from its image), as ``--images`` says; auto:
    the store's pixels when every shard has them and the student's input fits in them."""
    px = store.meta.pixels
    have = px is not None and all(has_pixels(store.shard_summary(s.name).get("digest", {})) for s in shards)
    fits = px is not None and student.data.hw[0] <= px.size[0] and student.data.hw[1] <= px.size[1]
    if cfg.data.images == "corpus" or (cfg.data.images == "auto" and cfg.data.corpus and not (have and fits)):
        return "corpus"
    if px is None or not have:
        what = ("keeps no pixels" if px is None else "has shards without pixels (first: "
                f"{next(s.name for s in shards if not has_pixels(store.shard_summary(s.name).get('digest', {})))})")
        raise TrainError(f"{'--images store' if cfg.data.images == 'store' else '--data is required'}: {store.url} {what} "
                         f"(extract --pixels, or kdcache store pixels {store.url} --data DATA)")
    if not fits:
        h, w = student.data.hw
        raise TrainError(f"the student's input {h}x{w} is larger than the {px.size[0]}x{px.size[1]} pixels {store.url} "
                         f"keeps of each view; give --data (the corpus) or a student of at most {px.size[0]}x{px.size[1]}")
    return "pixels"


def cached_source(cfg: TrainConfig, student: Student, *, rank: int, world: int, kept: RunDir | None, skip_log: str,
                  device: torch.device) -> TargetSource:
    store = Store.open(cfg.store)
    teachers = list(cfg.teachers) or list(store.meta.teachers)
    unknown = [t for t in teachers if t not in store.meta.teachers]
    if unknown:
        raise TrainError(f"--teacher {unknown[0]}: not in {cfg.store} (teachers: {', '.join(store.meta.teachers)})")
    recorded = ReadOptions.from_dict(store.meta.corpus)
    decode = _decode(cfg, recorded.decode)
    corpus = resolve_corpus(cfg.data.corpus, dataclasses.replace(recorded, decode=decode)) if cfg.data.corpus else None
    if corpus is not None:
        shards, bad = check_store_fits_corpus(store, corpus, teachers, skip_corrupt=cfg.data.skip_corrupt)
    else:
        shards, bad = store_shards(store, teachers, skip_corrupt=cfg.data.skip_corrupt)
    images = image_source(cfg, store, student, shards)
    check_derived_views(cfg, store, teachers)
    soft = {t: store.meta.teachers[t].logits["classes"] for t in teachers if store.meta.teachers[t].logits}
    classes = _soft_label_classes(cfg, soft, where=f"{cfg.store}", remedy="extract with --logits K")
    stored_k = min((store.meta.teachers[t].logits["k"] for t in soft), default=0)
    if classes and cfg.objectives.logits_top > stored_k:
        raise TrainError(f"--logits-top {cfg.objectives.logits_top}: the store keeps the top {stored_k} logits only")
    targets, computed = {}, {}
    for t in teachers:
        stats = None
        if needs_stats(cfg.objectives.normalize):
            stats = {}
            for kind in TOKEN_KINDS:
                stats[kind], fresh = reader_stats(store, t, kind, shards=[r.name for r in shards],
                                                  kept=kept and kept.load_stats(t, kind), skip_corrupt=cfg.data.skip_corrupt)
                if fresh:
                    computed[(t, kind)] = stats[kind]
        targets[t] = TargetDecoder(t, store.meta.teachers[t], codebooks=stored_codebooks(store, t), normalize=cfg.objectives.normalize,
                                   stats=stats, predict_codes=cfg.objectives.predict_codes, logits=bool(classes) and t in soft,
                                   logits_top=cfg.objectives.logits_top, dense=cfg.data.dense_views).to(device)
    metas = store.meta.teachers
    heads = [TeacherTarget(t, metas[t].dim, tuple(metas[t].grid), targets[t].codes_m) for t in teachers]
    spec = stream_spec(cfg, student, shards, stored_views=store.meta.views, policy=store.meta.view_policy,
                       store_url=cfg.store, decode=dataclasses.replace(recorded.decode, reduced=decode.reduced),
                       target_paths=[p for t in teachers for p in targets[t].read_paths],
                       skip_log=skip_log if cfg.data.skip_corrupt else None, source=images)
    return TargetSource(corpus=corpus, teachers=teachers, shards=shards, targets=targets, heads=heads,
                        dataset=SampleStream(spec, corpus, rank=rank, world=world), store=store, classes=classes,
                        provenance={"store": cfg.store, "store_meta": store.meta.to_dict()}, computed_stats=computed,
                        skipped=[{"epoch": None, "shard": n, "error": e, "samples_skipped": store.stored_rows(n)}
                                 for n, e in bad.items()])


def online_source(cfg: TrainConfig, student: Student, *, rank: int, world: int, kept: RunDir | None,
                  device: torch.device, progress: bool = True) -> TargetSource:
    corpus = resolve_corpus(cfg.data.corpus, ReadOptions(decode=_decode(cfg, DecodeOptions())))
    with torch.random.fork_rng(devices=[]):  # building teachers must not move the student's and heads' init
        teachers = [create_teacher(spec, device=device) for spec in cfg.teachers]
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise TrainError(f"--teacher: two teachers named {next(n for n in names if names.count(n) > 1)!r}")
    places, skipped = count_samples(corpus, corpus.options.decode, progress=progress and rank == 0)
    shards = [ShardRows(n, len(p), ONLINE_BLOCK) for n, p in places.items()]
    first = teachers[0].data
    policy = ViewPolicy.for_input(first.crop_pct, first.hw, seed=cfg.seed)
    inputs = tuple((teacher_input(t.name), Crop(t.input_hw, t.meta.interpolation)) for t in teachers)
    spec = stream_spec(cfg, student, shards, views="fresh", policy=policy, decode=corpus.options.decode, crops=inputs)
    dataset = SampleStream(spec, corpus, rank=rank, world=world, places=places)
    soft = {t.name: t.classes for t in teachers if t.classes}
    classes = _soft_label_classes(cfg, soft, where="--online", remedy="give teachers with a classifier head")
    targets, computed = {}, {}
    for t in teachers:
        stats, fresh = teacher_stats(t, dataset, normalize=cfg.objectives.normalize, images=cfg.online.stats_images, seed=cfg.seed,
                                     kept=kept and {kind: kept.load_stats(t.name, kind) for kind in TOKEN_KINDS})
        if fresh:
            computed.update({(t.name, kind): stats[kind] for kind in TOKEN_KINDS})
        targets[t.name] = LiveTargets(t, cfg.objectives.normalize, stats, logits=bool(classes) and t.name in soft).to(device)
    heads = [TeacherTarget(t.name, t.meta.dim, tuple(t.meta.grid)) for t in teachers]
    return TargetSource(corpus=corpus, teachers=names, shards=shards, targets=targets, heads=heads,
                        dataset=dataset, computed_stats=computed, skipped=skipped, classes=classes,
                        provenance={"online": True, "view_policy": policy.to_dict(),
                                    "teachers": {t.name: t.meta.to_dict() for t in teachers}})


def _decode(cfg: TrainConfig, recorded: DecodeOptions) -> DecodeOptions:
    """How the loader decodes the student's images: at the scale its crop needs (``auto``: the
    teacher's targets are what the store holds whatever the student's decode; a reduced decode is
    a few levels of noise on the student's side only, measured in ``bench quality``), unless
    --decode says; the store's limits (max pixels, min size) either way."""
    return dataclasses.replace(recorded, reduced=cfg.data.decode != "full")


def _soft_label_classes(cfg: TrainConfig, soft: dict[str, int], *, where: str, remedy: str) -> int:
    """The class count of the teachers whose soft labels the student learns (0 without
    ``--logits-loss``); they share the student's one classifier, so they must agree."""
    if cfg.objectives.logits_loss == "none":
        return 0
    if not soft:
        raise TrainError(f"--logits-loss {cfg.objectives.logits_loss}: no teacher in {where} gives soft labels ({remedy})")
    counts = set(soft.values())
    if len(counts) > 1:
        raise TrainError(f"--logits-loss {cfg.objectives.logits_loss}: the teachers' class counts differ "
                         f"({', '.join(f'{t}: {c}' for t, c in soft.items())}); the student has one classifier: "
                         f"distil one class space (--teacher)")
    return counts.pop()
