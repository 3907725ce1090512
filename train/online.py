"""Online distillation (``kdcache train --online``): the teachers run live, every step.

The baseline every cached run is measured against, and the fallback for users who cannot store
features. Same student, heads, losses, normalisation and sample order as a cached run (the
stream and split of ``data.stream``); only the source of the targets differs. In epoch ``e`` a
sample takes a fresh view, index ``e + 1`` of the store's view sequence
(``data.views.view_at``: RandomResizedCrop + flip seeded by ``(seed, key, index)``), cropped
at the student's input and at each teacher's, and the teachers run in the main process on the
training device. An online run of E epochs therefore sees exactly the views that a store
extracted with ``--views E+1 --seed SEED`` holds and that a cached run with ``--view-choice
augmented`` picks: the two runs differ only by the cache (a finite K, fp16 rounding).

Before training, one pass over the corpus counts the decodable samples of every shard and
notes where each one's image bytes are (the schedule's length, and what lets any rank read any
sample; bad images are skipped, and recorded in ``RUN/skipped.jsonl`` once the run directory is
written), and the teachers' normalisation statistics are taken from their
features on the first ``online_stats_images`` samples (kept in ``RUN/stats/``, so a resumed run
normalises exactly as before).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.data.corpus import Corpus
from kdcache.data.pixels import decodable
from kdcache.data.pixels import ShardPlaces, folder_files
from kdcache.data.stream import SampleStream
from kdcache.data.walk import record_to, screened
from kdcache.models.teacher import Teacher
from kdcache.store.meta import TOKEN_KINDS
from kdcache.targets.decoding import normalizers
from kdcache.targets.normalize import needs_stats
from kdcache.targets.stats import STATS_TOKENS, moments

log = logging.getLogger("kdcache.train")


ONLINE_BLOCK = 256  # rows per block of a corpus shard read by an online run (one ranged read of a tar each)


def teacher_input(teacher: str) -> str:
    """The batch field of one live teacher's crop (cut from the student's view at its input size)."""
    return f"input/{teacher}"


def online_view_index(epoch: int, view_choice: str) -> int:
    """Epoch ``e`` -> view ``e + 1`` (a fresh RandomResizedCrop); ``first`` -> the eval view
    (``kdcache eval fidelity`` on an online run)."""
    return 0 if view_choice == "first" else epoch + 1


def count_samples(corpus: Corpus, decode, *, progress: bool = True) -> tuple[dict[str, ShardPlaces], list[dict]]:
    """({shard: the places of the samples an online epoch delivers}, skip records): screened and
    decodable, each with where its image bytes are (so any of them can be read on its own); the
    others recorded (shard, key, error) for the run's skip log."""
    places, records = {}, []
    bar = tqdm(total=len(corpus.shards), unit="shard", desc="count samples", disable=not progress, dynamic_ncols=True)
    for shard in corpus.shards:
        skipped = []
        good = list(decodable(screened(corpus, shard, record_to(skipped)), decode=decode, handler=record_to(skipped)))
        places[shard.name] = ShardPlaces.from_samples(shard.name, good, files=folder_files(shard, [s.key for s in good])
                                                      if corpus.kind == "folder" else ())
        records += [{"epoch": None, "shard": shard.name, "key": r["key"], "error": r["error"], "samples_skipped": 1}
                    for r in skipped]
        bar.update(1)
    bar.close()
    return places, records


@torch.inference_mode()
def online_stats(teacher: Teacher, stream: SampleStream, images: int, *, seed: int) -> dict[str, dict]:
    """{'cls' | 'patch': {count, mean, covariance, source}} of the teacher's features on the
    first ``images`` samples of epoch 0 in corpus order (no shuffle), in float64; patch tokens are
    a seeded uniform sample of at most ``STATS_TOKENS``."""
    rng = np.random.default_rng(seed)
    key = teacher_input(teacher.name)
    cls, patch, crops, seen = [], [], [], 0
    per_image = max(1, STATS_TOKENS // max(1, images))

    def flush():
        s, p = teacher.features(torch.stack(crops).to(teacher.device))
        cls.append(s.double().cpu().numpy())
        p = p.double().cpu().numpy()
        take = min(per_image, p.shape[1])
        patch.extend(p[i, rng.choice(p.shape[1], take, replace=False)] for i in range(len(p)))
        crops.clear()

    spec = dataclasses.replace(stream.spec, shuffle=False, workers=0, color_jitter=0.0, last_batch="partial",
                               batch_size=1)
    first = SampleStream(spec, stream.corpus, places=stream.places)  # every rank: the same first images
    first.set_epoch(0)
    for sample in first:
        crops.append(sample[key])
        seen += 1
        if len(crops) == 32:
            flush()
        if seen >= images:
            break
    first.close()
    if crops:
        flush()
    source = {"online": teacher.spec.model, "weights_sha256": teacher.meta.weights_sha256, "images": seen}
    return {kind: {**moments(np.concatenate(rows)), "source": source} for kind, rows in (("cls", cls), ("patch", patch))}


def teacher_stats(teacher: Teacher, stream: SampleStream, *, normalize: str, images: int, seed: int,
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
        self.key = teacher_input(teacher.name)
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
