"""``kdcache bench extract``: is extraction bound by the teacher, as it should be?

Measured in one run on the same images and teacher: (1) the bare teacher forward on
pre-decoded, pre-cropped uint8 tensors (plus the cast to the storage dtype), (2) end-to-end
``kdcache extract`` (read tar, decode, crop, forward, compress, write). The ratio (2)/(1) is
the fraction of the teacher's speed the pipeline keeps; the target is >= 0.9.
"""
from __future__ import annotations

import tempfile
import time

import torch

from kdcache.data.corpus import resolve_corpus
from kdcache.data.decode import decode_image
from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.data.views import replay_view, sample_views
from kdcache.extract import ExtractOptions, extract
from kdcache.models import create_teacher
from kdcache.store import ViewPolicy


def _predecoded(corpus_dir: str, teacher) -> list[torch.Tensor]:
    corpus = resolve_corpus(corpus_dir)
    policy = ViewPolicy(views=1, crop_pct=teacher.meta.crop_pct)
    out = []
    for shard in corpus.shards:
        for s in corpus.samples(shard):
            rgb = decode_image(s.data)
            v = sample_views(policy, s.key, *rgb.shape[:2])[0]
            out.append(replay_view(torch.from_numpy(rgb).permute(2, 0, 1), v, teacher.input_hw, teacher.meta.interpolation))
    return out


def _bare_forward(teacher, crops, batch_size) -> float:
    batches = [torch.stack(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
    teacher.features(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        cls, patch = teacher.features(b.to(teacher.device))
        cls.half().cpu(), patch.half().cpu()
    return len(crops) / (time.perf_counter() - t0)


def bench_extract(*, teacher: str, images: int = 96, batch_size: int = 16, workers: int = 1, codec: str = "lz4") -> str:
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_corpus(f"{tmp}/corpus", digits=0, photos=images, shard_size=32)
        t = create_teacher(teacher)
        bare = _bare_forward(t, _predecoded(f"{tmp}/corpus", t), batch_size)
        opts = ExtractOptions(batch_size=batch_size, workers=workers, codec=codec, progress=False)
        extract(f"{tmp}/corpus", f"{tmp}/warm.zarr", [teacher], opts)  # warm caches, same as the bare warm-up
        t0 = time.perf_counter()
        s = extract(f"{tmp}/corpus", f"{tmp}/store.zarr", [teacher], opts)
        wall = time.perf_counter() - t0
    e2e_loop, e2e_wall = s.images / s.seconds, s.images / wall
    return "\n".join([
        f"# bench extract: {t.meta.model} {t.meta.input_size[1]}x{t.meta.input_size[2]}, {images} images, "
        f"batch {batch_size}, {workers} worker(s), codec {codec}, {torch.get_num_threads()} torch threads, device {t.device}",
        "",
        "| measurement | img/s | ratio to bare forward |",
        "|---|---|---|",
        f"| bare teacher forward (pre-decoded tensors) | {bare:.1f} | 1.00 |",
        f"| kdcache extract, pipeline loop | {e2e_loop:.1f} | {e2e_loop / bare:.2f} |",
        f"| kdcache extract, whole call (incl. model build, plan, summary) | {e2e_wall:.1f} | {e2e_wall / bare:.2f} |",
        "",
        f"ratio {e2e_loop / bare:.2f} (target >= 0.90)",
    ])
