"""DataLoader side of extraction: corpus shards -> batches of uint8 view crops.

Runs in DataLoader workers, so decoding and cropping overlap the teachers' forward pass.
Each worker takes whole shards; a batch never spans two shards, and every shard ends with a
batch marked ``last`` (possibly empty) that carries its failures, so the writer can finish
it. Bad samples follow the error policy: ``skip`` records ``(key, reason)``, ``fail`` ends
the run with a one-line message naming the shard and key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdcache.store import ViewPolicy

from .corpus import Corpus, CorpusShard, ShardReadError
from .decode import BadImage, DecodeOptions, decode_sample
from .views import replay_view, sample_views

ON_ERROR = ("skip", "fail")


@dataclass(frozen=True)
class InputGroup:
    """Teachers that share input size and interpolation get one set of crops."""

    size: tuple[int, int]
    interpolation: str


@dataclass(frozen=True)
class ShardJob:
    """What to do with one corpus shard. ``replay`` holds the stored (keys, views) when adding
    teachers to a complete store shard; otherwise views are drawn from the policy."""

    shard: CorpusShard
    teachers: tuple[str, ...]
    replay: tuple[np.ndarray, np.ndarray] | None = None


class ShardBatches(IterableDataset):
    def __init__(self, corpus: Corpus, jobs: list[ShardJob], *, policy: ViewPolicy, groups: list[InputGroup],
                 batch_size: int, on_error: str = "skip", decode: DecodeOptions = DecodeOptions()):
        self.corpus, self.jobs, self.policy, self.groups = corpus, jobs, policy, groups
        self.batch_size, self.on_error, self.decode = batch_size, on_error, decode

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for job in self.jobs[wid::nw]:
            try:
                yield from self._shard(job)
            except _Fatal as e:
                yield {"shard": job.shard.name, "error": str(e)}
                return

    def _shard(self, job: ShardJob):
        batch = _Batch()
        failed: list[dict] = []
        seen: set[str] = set()
        replay = None
        if job.replay is not None:
            replay = {k: i for i, k in enumerate(job.replay[0].tolist())}
        for s in self.corpus.samples(job.shard):
            if isinstance(s, ShardReadError):
                self._bad(job, "(tar)", s.error, failed)
                break
            if replay is not None and s.key not in replay:
                continue  # failed at extraction: not in the store
            if s.key in seen:
                self._bad(job, s.key, "duplicate key in shard", failed)
                continue
            try:
                rgb = decode_sample(s, self.decode)
            except BadImage as e:
                if replay is not None:
                    raise _Fatal(f"{job.shard.url}: sample {s.key!r} was extracted before but now fails: {e}")
                self._bad(job, s.key, str(e), failed)
                continue
            seen.add(s.key)
            h, w = rgb.shape[:2]
            views = job.replay[1][replay[s.key]] if replay is not None else sample_views(self.policy, s.key, h, w)
            image = torch.from_numpy(rgb).permute(2, 0, 1)
            crops = [torch.stack([replay_view(image, v, g.size, g.interpolation) for v in views]) for g in self.groups]
            batch.add(s.key, views, crops)
            if len(batch.keys) == self.batch_size:
                yield batch.emit(job.shard.name, last=False)
                batch = _Batch()
        if replay is not None and len(seen) != len(replay):
            missing = next(k for k in replay if k not in seen)
            raise _Fatal(f"{job.shard.url}: key {missing!r} is in store shard {job.shard.name} but not in the corpus")
        out = batch.emit(job.shard.name, last=True)
        out["failed"] = failed
        yield out

    def _bad(self, job: ShardJob, key: str, reason: str, failed: list[dict]) -> None:
        if self.on_error == "fail":
            raise _Fatal(f"{job.shard.url}: sample {key!r}: {reason} (--on-error fail)")
        failed.append({"key": key, "error": reason})


class _Fatal(Exception):
    pass


class _Batch:
    def __init__(self):
        self.keys, self.views, self.crops = [], [], []

    def add(self, key, views, crops):
        self.keys.append(key)
        self.views.append(views)
        self.crops.append(crops)

    def emit(self, shard: str, *, last: bool) -> dict:
        n = len(self.keys)
        crops = [torch.stack([c[g] for c in self.crops]) if n else None for g in range(len(self.crops[0]) if n else 0)]
        return {"shard": shard, "keys": list(self.keys), "last": last,
                "views": np.stack(self.views).astype(np.float32) if n else None,
                "crops": crops}  # crops[g]: (n, K, 3, h, w) uint8
