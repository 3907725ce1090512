"""Online distillation (``kdcache train --online``): the teachers run live, every step.

The baseline every cached run is measured against, and the fallback for users who cannot store
features. Same student, heads, losses, normalisation and sample order as a cached run (the
shuffle of ``loader.ShardStream``); only the source of the targets differs. In epoch ``e`` a
sample takes a fresh view, index ``e + 1`` of the store's view sequence
(``data.views.view_at``: RandomResizedCrop + flip seeded by ``(seed, key, index)``), cropped at
the student's input and at each teacher's, and the teachers run in the main process on the
training device. An online run of E epochs therefore sees exactly the views that a store
extracted with ``--views E+1 --seed SEED`` holds and that a cached run with ``--view-choice
augmented`` picks: the two runs differ only by the cache (a finite K, fp16 rounding).

Before training, one pass over the corpus counts the decodable samples of every shard (the
schedule's length; bad images are skipped and recorded in ``RUN/skipped.jsonl``), and the
teachers' normalisation statistics are taken from their features on the first
``online_stats_images`` samples (kept in ``RUN/stats/``, so a resumed run normalises exactly as
before).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.data.corpus import Corpus
from kdcache.data.decode import BadImage, decode_sample
from kdcache.data.views import replay_view, view_at
from kdcache.data.walk import Skip, screen
from kdcache.models import Teacher
from kdcache.store import ViewPolicy

from .loader import LoaderSpec, ShardStream, record_skip, sample_label
from .normalize import create_normalizer, needs_stats
from .rundir import RunDir
from .stats import load_run_stats, save_run_stats

log = logging.getLogger("kdcache.train")

STATS_TOKENS = 131072  # as many tokens as a store's statistics sample (quantize.stats)


@dataclass(frozen=True)
class TeacherInput:
    """One teacher's crop: its input size and interpolation."""

    teacher: str
    size: tuple[int, int]
    interpolation: str

    @property
    def key(self) -> str:
        return f"input/{self.teacher}"


def online_view_index(epoch: int, view_choice: str) -> int:
    """Epoch ``e`` -> view ``e + 1`` (a fresh RandomResizedCrop); ``first`` -> the eval view
    (``kdcache eval fidelity`` on an online run)."""
    return 0 if view_choice == "first" else epoch + 1


class OnlineStream(ShardStream):
    """Yields dicts: key, image (student's crop), view, and ``input/<teacher>`` crops (uint8)."""

    def __init__(self, corpus: Corpus, spec: LoaderSpec, policy: ViewPolicy, inputs: tuple[TeacherInput, ...], *,
                 epoch: int = 0, rank: int = 0, world: int = 1):
        super().__init__(corpus, spec, epoch=epoch, rank=rank, world=world)
        self.policy, self.inputs = policy, inputs

    def with_spec(self, spec: LoaderSpec) -> "OnlineStream":
        return OnlineStream(self.corpus, spec, self.policy, self.inputs, rank=self.rank, world=self.world)

    def _shard(self, name: str, epoch: int):
        spec = self.spec
        index = online_view_index(epoch, spec.view_choice)
        for s in screen(self.corpus.samples(self.corpus.shard(name))):
            if isinstance(s, Skip):
                continue
            try:
                rgb = decode_sample(s, spec.decode)
            except BadImage:  # counted out and recorded by the counting pass
                continue
            image = torch.from_numpy(rgb).permute(2, 0, 1)
            view = view_at(self.policy, s.key, index, image.shape[-2], image.shape[-1])
            out = {"key": s.key, "image": replay_view(image, view, spec.input_size, spec.interpolation), "view": index,
                   "label": sample_label(s)}
            for t in self.inputs:
                out[t.key] = replay_view(image, view, t.size, t.interpolation)
            yield out


def count_samples(corpus: Corpus, shards, decode, *, skip_log: str | None, progress: bool = True) -> dict[str, int]:
    """{shard: samples an online epoch delivers}: screened and decodable; the others recorded."""
    counts = {}
    bar = tqdm(total=len(shards), unit="shard", desc="count samples", disable=not progress, dynamic_ncols=True)
    for name in shards:
        n = 0
        for s in screen(corpus.samples(corpus.shard(name))):
            reason = s.error if isinstance(s, Skip) else None
            if reason is None:
                try:
                    decode_sample(s, decode)
                    n += 1
                    continue
                except BadImage as e:
                    reason = str(e)
            if skip_log:
                record_skip(skip_log, {"epoch": None, "shard": name, "key": s.key, "error": reason, "samples_skipped": 1})
        counts[name] = n
        bar.update(1)
    bar.close()
    return counts


@torch.inference_mode()
def online_stats(teacher: Teacher, stream: OnlineStream, images: int, *, seed: int) -> dict[str, dict]:
    """{'cls' | 'patch': {count, mean, covariance, source}} of the teacher's features on the
    first ``images`` samples of epoch 0 (corpus order, no shuffle), in float64; patch tokens are
    a seeded uniform sample of at most ``STATS_TOKENS``."""
    rng = np.random.default_rng(seed)
    key = f"input/{teacher.name}"
    cls, patch, crops, seen = [], [], [], 0
    per_image = max(1, STATS_TOKENS // max(1, images))

    def flush():
        s, p = teacher.features(torch.stack(crops).to(teacher.device))
        cls.append(s.double().cpu().numpy())
        p = p.double().cpu().numpy()
        take = min(per_image, p.shape[1])
        patch.extend(p[i, rng.choice(p.shape[1], take, replace=False)] for i in range(len(p)))
        crops.clear()

    for shard in stream.spec.shards:
        for sample in stream._shard(shard, 0):
            crops.append(sample[key])
            seen += 1
            if len(crops) == 32:
                flush()
            if seen >= images:
                break
        if seen >= images:
            break
    if crops:
        flush()
    out = {}
    for kind, rows in (("cls", np.concatenate(cls)), ("patch", np.concatenate(patch))):
        out[kind] = {"count": len(rows), "mean": rows.mean(0),
                     "covariance": np.cov(rows.T) if len(rows) > 1 else np.eye(rows.shape[1]),
                     "source": {"online": teacher.spec.model, "weights_sha256": teacher.meta.weights_sha256, "images": seen}}
    return out


class OnlineTargets(nn.Module):
    """One live teacher: a batch's ``input/<teacher>`` crops -> normalised {'summary', 'patch'},
    the same dict ``targets.TeacherTargets`` makes from stored rows."""

    def __init__(self, teacher: Teacher, normalize: str, stats: dict | None):
        super().__init__()
        self.name = teacher.name
        self.teacher = teacher  # a plain attribute: frozen, never in the run's state dict or optimizer
        self.key = f"input/{teacher.name}"
        self.norm = nn.ModuleDict({kind: create_normalizer(normalize, stats[kind] if stats else None, teacher.meta.dim)
                                   for kind in ("cls", "patch")})

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        summary, patches = self.teacher.features(batch[self.key])
        # inference-mode tensors cannot be saved for the loss's backward: plain copies
        return {"summary": self.norm["cls"](summary.clone()), "patch": self.norm["patch"](patches.clone())}


def teacher_stats(teacher: Teacher, stream: OnlineStream, *, normalize: str, images: int, seed: int, rundir: RunDir,
                  write: bool) -> dict | None:
    """The run's statistics of one teacher: kept ones (resume, evaluation) or a fresh pass."""
    if not needs_stats(normalize):
        return None
    kept = {kind: load_run_stats(rundir, teacher.name, kind) for kind in ("cls", "patch")}
    if all(v is not None and v["source"].get("weights_sha256") == teacher.meta.weights_sha256 for v in kept.values()):
        return kept
    log.info("teacher %s: normalisation statistics from its features on %d images", teacher.name, images)
    st = online_stats(teacher, stream, images, seed=seed)
    if write:
        for kind, v in st.items():
            save_run_stats(rundir, teacher.name, kind, v)
    return st
