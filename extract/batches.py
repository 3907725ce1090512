"""DataLoader side of extraction: corpus shards -> ``ViewBatch``es of uint8 view crops.

Runs in DataLoader workers, so decoding and cropping overlap the teachers' forward pass. Each
worker takes whole shards (``data.partition``); a shard's work is a chain of small stages:

    samples (data.walk: screen, or align with the stored keys when adding a teacher)
    -> decode (bad-input policy) -> views (drawn, or the stored ones) -> crops -> batches

The skip/fail policy is one function passed in (``data.walk.skip_handler``): ``skip`` records
``(key, reason)``, ``fail`` raises naming the shard and key. A batch never spans two shards;
the last batch of a shard (possibly empty) carries the shard's failures so the writer can
finish it. Errors are raised, never sent through the stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from kdcache.data.corpus import Corpus, CorpusShard, RawSample
from kdcache.data.decode import BadImage, DecodeOptions, decode_sample
from kdcache.data.partition import current_worker, worker_share
from kdcache.data.views import replay_view, sample_views
from kdcache.data.walk import AlignError, Skip, align, screen, skip_handler
from kdcache.store import Store, ViewPolicy
from kdcache.store.lease import leases_for


@dataclass(frozen=True)
class InputGroup:
    """Teachers that share input size and interpolation get one set of crops."""

    size: tuple[int, int]
    interpolation: str


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


@dataclass
class ViewBatch:
    """Up to ``batch_size`` samples of one shard: keys, their (K, 5) views, and per input group
    the crops (n, K, 3, h, w) uint8. ``last`` closes the shard; it then carries ``failed``."""

    shard: str
    keys: list[str]
    views: np.ndarray  # (n, K, 5) float32
    crops: list[torch.Tensor]
    last: bool = False
    failed: list[dict] = field(default_factory=list)
    moved_on: str | None = None  # why this job leaves the shard to another (it holds the lease, or finished it)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "ViewBatch":  # called by DataLoader(pin_memory=True)
        self.crops = [c.pin_memory() for c in self.crops]
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
    def __init__(self, corpus: Corpus, jobs: list[ShardJob], *, policy: ViewPolicy, groups: list[InputGroup],
                 batch_size: int, on_error: str = "skip", decode: DecodeOptions = DecodeOptions(),
                 lease: LeaseSpec | None = None):
        self.corpus, self.jobs, self.policy, self.groups = corpus, jobs, policy, groups
        self.batch_size, self.on_error, self.decode, self.lease = batch_size, on_error, decode, lease

    def __iter__(self) -> Iterator[ViewBatch]:
        worker, workers = current_worker()
        leases = store = None
        if self.lease is not None:  # opened here: a filesystem is not shared across a fork
            leases = leases_for(self.lease.store_url, self.lease.owner, seconds=self.lease.seconds, pid=self.lease.pid)
            store = Store.open(self.lease.store_url)
        for job in worker_share(self.jobs, worker, workers):
            reason = None
            if leases is not None:
                holder = leases.acquire(job.shard.name)
                if holder is not None:
                    reason = f"being written by {holder.describe()}"
                elif store.is_complete(job.shard.name, job.teachers):  # finished by another job since we planned
                    leases.release(job.shard.name)
                    reason = "completed by another job"
            if reason is not None:
                yield ViewBatch(job.shard.name, [], np.zeros((0, 0, 5), np.float32), [], last=True, moved_on=reason)
                continue
            yield from self.shard_batches(job)

    def shard_batches(self, job: ShardJob) -> Iterator[ViewBatch]:
        failed: list[dict] = []
        handle = skip_handler(self.on_error, job.shard, lambda skip: failed.append(skip.record()))
        if job.replay is None:
            samples = drawn_views(new_samples(self.corpus, job.shard, handle), self.policy, self.decode, handle)
        else:
            samples = stored_views(self.corpus, job.shard, job.replay, self.decode)
        yield from batched(cropped(samples, self.groups), job.shard.name, self.batch_size, failed)


def new_samples(corpus: Corpus, shard: CorpusShard, handle) -> Iterator[RawSample]:
    """Screened samples of a shard; Skips go to the error policy."""
    for s in screen(corpus.samples(shard)):
        if isinstance(s, Skip):
            handle(s)
        else:
            yield s


def drawn_views(samples: Iterable[RawSample], policy: ViewPolicy, decode: DecodeOptions, handle):
    """Decode each sample and draw its K views from the policy; bad images go to the policy."""
    for s in samples:
        try:
            rgb = decode_sample(s, decode)
        except BadImage as e:
            handle(Skip(s.key, str(e)))
            continue
        yield s.key, rgb, sample_views(policy, s.key, *rgb.shape[:2])


def stored_views(corpus: Corpus, shard: CorpusShard, replay: Replay, decode: DecodeOptions):
    """The samples a complete store shard holds, with its stored views (adding a teacher)."""
    for row, s in align(corpus, shard, replay.keys, replay.failed):
        try:
            rgb = decode_sample(s, decode)
        except BadImage as e:
            raise AlignError(f"{shard.url}: sample {s.key!r} was extracted before but now fails: {e}") from None
        yield s.key, rgb, replay.views[row]


def cropped(samples, groups: list[InputGroup]):
    """(key, rgb, views) -> (key, views, [crops (K, 3, h, w) uint8 per input group])."""
    for key, rgb, views in samples:
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        yield key, views, [torch.stack([replay_view(image, v, g.size, g.interpolation) for v in views]) for g in groups]


def batched(samples, shard: str, batch_size: int, failed: list[dict]) -> Iterator[ViewBatch]:
    """Group into ViewBatches; the last one (possibly empty) closes the shard with its failures."""
    keys, views, crops = [], [], []

    def emit(last: bool) -> ViewBatch:
        groups = len(crops[0]) if crops else 0
        return ViewBatch(shard, list(keys), np.stack(views).astype(np.float32) if views else np.zeros((0, 0, 5), np.float32),
                         [torch.stack([c[g] for c in crops]) for g in range(groups)], last=last,
                         failed=list(failed) if last else [])

    for key, v, c in samples:
        keys.append(key)
        views.append(v)
        crops.append(c)
        if len(keys) == batch_size:
            yield emit(last=False)
            keys, views, crops = [], [], []
    yield emit(last=True)
