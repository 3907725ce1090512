"""DataLoader side of extraction: corpus shards -> ``ViewBatch``es of uint8 view crops.

Runs in DataLoader workers, so decoding and cropping overlap the teachers' forward pass. Each
worker takes whole shards (``data.partition``); a shard's work is two stages and a batcher:

    samples (data.walk: screened, or aligned with the stored keys when adding a teacher)
    -> pixels (data.pixels: decode, the views drawn or the stored ones, a crop per input size)
    -> batches

The skip/fail policy is one function passed to both stages (``data.walk.skip_handler``):
``skip`` records ``(key, reason)``, ``fail`` raises naming the shard and key; when adding a
teacher, a stored sample that no longer decodes is refused (``changed_since_extraction``). A
batch never spans two shards; the last batch of a shard (possibly empty) carries the shard's
failures so the writer can finish it. Errors are raised, never sent through the stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import simplejpeg
import torch
from torch.utils.data import IterableDataset

from kdcache.data.corpus import Corpus, CorpusShard, DecodeOptions
from kdcache.data.partition import current_worker, worker_share
from kdcache.data.pixels import Crop, ViewPixels, view_pixels
from kdcache.data.views import sample_views
from kdcache.data.walk import align, changed_since_extraction, record_to, screened, skip_handler
from kdcache.store import Store, ViewPolicy
from kdcache.store.lease import leases_for
from kdcache.store.meta import PixelSpec, has_pixels
from kdcache.store.checks import bytes_crc32


@dataclass(frozen=True)
class Replay:
    """A complete store shard's index: teachers are added on exactly these samples and views."""

    keys: list[str]
    views: np.ndarray  # (n, K, 5)
    failed: list[dict]


@dataclass(frozen=True)
class ShardJob:
    """What to do with one corpus shard: draw views (new shard) or replay stored ones."""

    shard: CorpusShard
    teachers: tuple[str, ...]
    replay: Replay | None = None
    pixels: bool = False  # a complete shard gets its views' pixels (kdcache store pixels)


@dataclass
class ViewBatch:
    """Up to ``batch_size`` samples of one shard: keys, their (K, 5) views, and per input group
    the crops (n, K, 3, h, w) uint8. ``last`` closes the shard; it then carries ``failed``."""

    shard: str
    keys: list[str]
    views: np.ndarray  # (n, K, 5) float32
    crops: list[torch.Tensor]
    last: bool = False
    whole: list[torch.Tensor] = field(default_factory=list)  # per dense group: the whole images (n, 3, h, w) uint8
    origin: np.ndarray | None = None  # (n, 4) int64: where each image's bytes are in the corpus shard, their CRC-32, label
    pixels: list | np.ndarray | None = None  # extract --pixels: n lists of K JPEGs, or (n, K, H, W, 3) uint8 (raw)
    failed: list[dict] = field(default_factory=list)
    moved_on: str | None = None  # why this job leaves the shard to another (it holds the lease, or finished it)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "ViewBatch":  # called by DataLoader(pin_memory=True)
        self.crops = [c.pin_memory() for c in self.crops]
        self.whole = [c.pin_memory() for c in self.whole]
        return self


@dataclass(frozen=True)
class LeaseSpec:
    """How a worker takes a shard's lease for the job (``store.lease``): the job's owner id and
    the main process's pid, so the lease outlives the worker while the writer still writes."""

    store_url: str
    owner: str
    seconds: float
    pid: int


class ShardBatches(IterableDataset):
    """Teachers that share input size and interpolation (one ``Crop``) share the crops."""

    def __init__(self, corpus: Corpus, jobs: list[ShardJob], *, policy: ViewPolicy, groups: list[Crop],
                 batch_size: int, on_error: str = "skip", decode: DecodeOptions = DecodeOptions(),
                 lease: LeaseSpec | None = None, dense_groups: list[Crop] = (), pixels=None):
        self.corpus, self.jobs, self.policy, self.groups = corpus, jobs, policy, groups
        self.pixels = pixels  # extract --pixels: (PixelSpec, the group whose crops they are), encoded here
        self.dense_groups = list(dense_groups)  # whole-image sizes of the teachers' dense maps
        self.batch_size, self.on_error, self.decode, self.lease = batch_size, on_error, decode, lease

    def __iter__(self) -> Iterator[ViewBatch]:
        worker, workers = current_worker()
        leases = store = None
        if self.lease is not None:  # opened here: a filesystem is not shared across a fork
            leases = leases_for(self.lease.store_url, self.lease.owner, seconds=self.lease.seconds, pid=self.lease.pid)
            store = Store.open(self.lease.store_url, index=False)  # a writer: the shards decide
        for job in worker_share(self.jobs, worker, workers):
            reason = None
            if leases is not None:
                holder = leases.acquire(job.shard.name)
                if holder is not None:
                    reason = f"being written by {holder.describe()}"
                elif store.is_complete(job.shard.name, job.teachers) and (  # finished by another job since we planned
                        not job.pixels or has_pixels((store.shard_attrs(job.shard.name) or {}).get("digest", {}))):
                    leases.release(job.shard.name)
                    reason = "completed by another job"
            if reason is not None:
                yield ViewBatch(job.shard.name, [], np.zeros((0, 0, 5), np.float32), [], last=True, moved_on=reason)
                continue
            yield from self.shard_batches(job)

    def shard_batches(self, job: ShardJob) -> Iterator[ViewBatch]:
        failed: list[dict] = []
        if job.replay is None:  # a new shard: views drawn from the policy
            handler = skip_handler(self.on_error, job.shard, record_to(failed))
            samples = screened(self.corpus, job.shard, handler)
            policy = self.policy
            views = lambda s, h, w: sample_views(policy, s.key, h, w)  # noqa: E731
        else:  # a complete shard gets a teacher: exactly its stored samples and views
            handler = changed_since_extraction(job.shard)
            samples = align(self.corpus, job.shard, job.replay.keys, job.replay.failed)
            stored = job.replay.views
            views = lambda s, h, w: stored[s.row]  # noqa: E731
        pixels = view_pixels(samples, views=views, crops=self.groups, decode=self.decode, handler=handler,
                             whole=self.dense_groups)
        encode = store_pixels(*self.pixels) if self.pixels is not None and (job.replay is None or job.pixels) else None
        yield from batched(pixels, job.shard.name, self.batch_size, failed, encode=encode)


def origin_rows(samples) -> np.ndarray:
    """(n, 4) int64 ``origin`` rows of samples as read: their image's offset and length in the corpus
    shard, the CRC-32 of those bytes (computed from the bytes in memory), the label (-1: none)."""
    return np.array([(s.offset, s.size, bytes_crc32(s.data) if s.data is not None else -1,
                      -1 if s.label is None else s.label) for s in samples], dtype=np.int64).reshape(-1, 4)


def store_pixels(spec: PixelSpec, group: int):
    """The views' pixels as the store keeps them, from the crops of group ``group`` (n, K, 3, h, w)
    uint8: raw (n, K, h, w, 3), or n lists of K JPEGs of ``spec.quality`` (libjpeg-turbo, chroma at full
    resolution: 4:4:4 keeps a small crop's colour edges, for about 15% more bytes than 4:2:0; measured
    in docs/store-format.md). In the DataLoader worker, off the teachers' path."""
    def encode(crops: list[torch.Tensor]):
        views = crops[group].permute(0, 1, 3, 4, 2).contiguous().numpy()  # (n, K, h, w, 3)
        if spec.format == "raw":
            return views
        return [[simplejpeg.encode_jpeg(v, quality=spec.quality, colorspace="RGB", colorsubsampling="444") for v in row]
                for row in views]
    return encode


def batched(items: Iterable[ViewPixels], shard: str, batch_size: int, failed: list[dict], *,
            encode=None) -> Iterator[ViewBatch]:
    """Group into ViewBatches; the last one (possibly empty) closes the shard with its failures.
    ``encode``: each batch's crops -> the pixels the store keeps (``store_pixels``)."""
    group: list[ViewPixels] = []

    def emit(last: bool) -> ViewBatch:
        crops = [torch.stack([p.crops[g] for p in group]) for g in range(len(group[0].crops))] if group else []
        whole = [torch.stack([p.whole[g] for p in group]) for g in range(len(group[0].whole))] if group else []
        views = np.stack([p.views for p in group]).astype(np.float32) if group else np.zeros((0, 0, 5), np.float32)
        return ViewBatch(shard, [p.sample.key for p in group], views, crops, last=last,
                         failed=list(failed) if last else [], whole=whole, origin=origin_rows([p.sample for p in group]),
                         pixels=encode(crops) if encode is not None and group else None)

    for item in items:
        group.append(item)
        if len(group) == batch_size:
            yield emit(last=False)
            group = []
    yield emit(last=True)
