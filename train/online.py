"""Online distillation (``kdcache train --online``): the teachers run live, every step.

The baseline every cached run is measured against, and the fallback for users who cannot store
features. Same student, heads, losses, normalisation and sample order as a cached run (the
shuffle of ``loader.ShardStream``); only the source of the targets differs. In epoch ``e`` a
sample takes a fresh view, index ``e + 1`` of the store's view sequence
(``data.pixels.view_at``: RandomResizedCrop + flip seeded by ``(seed, key, index)``), cropped
at the student's input and at each teacher's, and the teachers run in the main process on the
training device. An online run of E epochs therefore sees exactly the views that a store
extracted with ``--views E+1 --seed SEED`` holds and that a cached run with ``--view-choice
augmented`` picks: the two runs differ only by the cache (a finite K, fp16 rounding).

Before training, one pass over the corpus counts the decodable samples of every shard (the
schedule's length; bad images are skipped, and recorded in ``RUN/skipped.jsonl`` once the run
directory is written), and the teachers' normalisation statistics are taken from their
features on the first ``online_stats_images`` samples (kept in ``RUN/stats/``, so a resumed run
normalises exactly as before).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.data.corpus import Corpus
from kdcache.data.pixels import Crop, decodable, view_at, view_pixels
from kdcache.data.walk import counted_before, record_to, screened
from kdcache.models.teacher import Teacher
from kdcache.store.meta import TOKEN_KINDS, ViewPolicy
from kdcache.targets.decoding import normalizers
from kdcache.targets.normalize import needs_stats
from kdcache.targets.stats import STATS_TOKENS, moments

from .loader import LoaderSpec, ShardStream, sample_label

log = logging.getLogger("kdcache.train")


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
    """Yields dicts: key, image (student's crop), view, label, and ``input/<teacher>`` crops (uint8)."""

    def __init__(self, corpus: Corpus, spec: LoaderSpec, policy: ViewPolicy, inputs: tuple[TeacherInput, ...], *,
                 epoch: int = 0, rank: int = 0, world: int = 1):
        super().__init__(corpus, spec, epoch=epoch, rank=rank, world=world)
        self.policy, self.inputs = policy, inputs

    def with_spec(self, spec: LoaderSpec) -> "OnlineStream":
        return OnlineStream(self.corpus, spec, self.policy, self.inputs, rank=self.rank, world=self.world)

    def _shard(self, name: str, epoch: int):
        spec, policy = self.spec, self.policy
        index = online_view_index(epoch, spec.view_choice)
        crops = [spec.crop, *(Crop(t.size, t.interpolation) for t in self.inputs)]
        shard = self.corpus.shard(name)

        def fresh_view(s, height: int, width: int) -> np.ndarray:
            return view_at(policy, s.key, index, height, width)

        # samples that do not decode were counted out and recorded before training (count_samples)
        for item in view_pixels(screened(self.corpus, shard, counted_before), views=fresh_view, crops=crops,
                                decode=spec.decode, handler=counted_before):
            out = {"key": item.sample.key, "image": item.crops[0][0], "view": index, "label": sample_label(item.sample)}
            for t, crop in zip(self.inputs, item.crops[1:]):
                out[t.key] = crop[0]
            yield out


def count_samples(corpus: Corpus, shards, decode, *, progress: bool = True) -> tuple[dict[str, int], list[dict]]:
    """({shard: samples an online epoch delivers}, skip records): screened and decodable; the
    others recorded (shard, key, error) for the run's skip log."""
    counts, records = {}, []
    bar = tqdm(total=len(shards), unit="shard", desc="count samples", disable=not progress, dynamic_ncols=True)
    for name in shards:
        shard, skipped = corpus.shard(name), []
        counts[name] = sum(1 for _ in decodable(screened(corpus, shard, record_to(skipped)), decode=decode,
                                                handler=record_to(skipped)))
        records += [{"epoch": None, "shard": name, "key": r["key"], "error": r["error"], "samples_skipped": 1}
                    for r in skipped]
        bar.update(1)
    bar.close()
    return counts, records


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
    source = {"online": teacher.spec.model, "weights_sha256": teacher.meta.weights_sha256, "images": seen}
    return {kind: {**moments(np.concatenate(rows)), "source": source} for kind, rows in (("cls", cls), ("patch", patch))}


def teacher_stats(teacher: Teacher, stream: OnlineStream, *, normalize: str, images: int, seed: int,
                  kept: dict | None) -> tuple[dict | None, bool]:
    """(the run's statistics of one teacher, computed here): ``kept`` ones (resume, evaluation)
    when they come from these weights, else a fresh pass; None when ``normalize`` needs none."""
    if not needs_stats(normalize):
        return None, False
    if kept and all(kept.get(kind) is not None and kept[kind]["source"].get("weights_sha256") == teacher.meta.weights_sha256
                    for kind in TOKEN_KINDS):
        return kept, False
    log.info("teacher %s: normalisation statistics from its features on %d images", teacher.name, images)
    return online_stats(teacher, stream, images, seed=seed), True


class LiveTargets(nn.Module):
    """One live teacher: a batch's ``input/<teacher>`` crops -> normalised {'summary', 'patch'}
    (and its full 'logits'), the same dict ``targets.decoding.TargetDecoder`` makes from stored rows."""

    def __init__(self, teacher: Teacher, normalize: str, stats: dict | None, *, logits: bool = False):
        super().__init__()
        self.name = teacher.name
        self.teacher = teacher  # a plain attribute: frozen, never in the run's state dict or optimizer
        self.key = f"input/{teacher.name}"
        self.norm = normalizers(normalize, stats, teacher.meta.dim)
        self.gives_logits = logits
        self.grid = tuple(teacher.meta.grid)
        self.live = True  # its targets are computed on the batch itself: exact for mixed images (train.trainer)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        summary, patches, logits = self.teacher.outputs(batch[self.key], logits=self.gives_logits)
        # inference-mode tensors cannot be saved for the loss's backward: plain copies
        out = {"summary": self.norm["cls"](summary.clone()), "patch": self.norm["patch"](patches.clone())}
        if logits is not None:
            out["logits"] = {"full": logits.clone()}  # the whole distribution: no top-K, no tail to assume
        return out
