"""``kdcache bench train``: what caching buys, measured in one run on the same batches.

(a) online distillation: teacher forward + student step, per batch;
(b) cached targets: the kdcache loader (decode, crop replay, stored targets) + device-side
    target decoding + student step;
(c) student step alone on in-memory tensors (the floor).
Reports a/b (the speedup), b/c (loader overhead, target <= 1.10), a/c (the ideal speedup),
loader samples/s with the student removed, and target bytes read per sample.
"""
from __future__ import annotations

import tempfile
import time

import torch
from torch.utils.data import DataLoader

from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.extract import ExtractOptions, extract
from kdcache.models import create_teacher
from kdcache.train.build import build_run
from kdcache.train.config import TrainConfig
from kdcache.train.loader import DistillStream, collate, to_device
from kdcache.train.step import distill_step


class _Epochs(DistillStream):
    def __iter__(self):
        while True:
            yield from super().__iter__()
            self.epoch += 1


def _timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench_train(*, teacher: str, student: str, images: int = 96, batch_size: int = 16, steps: int = 6, workers: int = 1,
                quantize: str | None = None) -> str:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir, store_url = f"{tmp}/corpus", f"{tmp}/store.zarr"
        build_demo_corpus(corpus_dir, digits=0, photos=images, shard_size=max(batch_size, images // 4))
        extract(corpus_dir, store_url, [teacher], ExtractOptions(progress=False, quantize=quantize, batch_size=batch_size,
                                                                  quantize_sample=4096, quantize_pool=1))
        # the trainer's own builder: the same student, heads, targets, loader and step as `kdcache train`
        run = build_run(TrainConfig(store=store_url, data=corpus_dir, student=student, out=f"{tmp}/run", batch_size=batch_size,
                                    workers=workers, lr=1e-4, head_hidden=512, shuffle_buffer=64))
        t_name = run.teachers[0]
        tmeta = run.store.meta.teachers[t_name]
        model, targets, dev, opt = run.model, run.targets[t_name], run.device, run.optimizer

        def step(images_u8, tgt):
            distill_step(model, images_u8, {t_name: tgt}, loss_spec=run.loss_spec, weights=run.weights, optimizer=opt,
                         amp=run.cfg.amp, clip_grad=run.cfg.clip_grad)

        def batches(epoch=0):
            # epochs back to back in the same workers: this corpus is a few batches long, and a
            # worker start per epoch (which real epochs amortise) would dominate the timing
            yield from DataLoader(_Epochs(run.corpus, run.dataset.spec, epoch=epoch), batch_size=batch_size,
                                  num_workers=workers, collate_fn=collate, drop_last=True, pin_memory=dev.type == "cuda",
                                  prefetch_factor=4 if workers else None)

        # (c) in-memory: one real batch, decoded targets held on the device
        fixed = to_device(next(batches()), dev)
        fixed_t = {k: v.detach() for k, v in targets(fixed).items()}
        t_c = _timed(lambda: step(fixed["image"], fixed_t), steps)
        # (a) online: the teacher runs on every batch (on its own view of the same images)
        tch = create_teacher(teacher, device=dev)
        t_in = tuple(tch.meta.input_size[1:])
        teacher_imgs = torch.nn.functional.interpolate(fixed["image"].float(), size=t_in, mode="bilinear").round().clamp(0, 255).to(torch.uint8)

        def online():
            summary, patches = tch.features(teacher_imgs)
            with torch.no_grad():
                tgt = {"summary": targets.norm["cls"](summary), "patch": targets.norm["patch"](patches)}
            step(fixed["image"], tgt)
        t_a = _timed(online, steps)
        # (b) cached: the real loader, targets decoded on the device
        it = batches()

        def cached():
            b = to_device(next(it), dev)
            step(b["image"], targets(b))
        t_b = _timed(cached, steps)
        # (b') the same loader and device-side decoding, with the student step replaced by an
        # equal wait that leaves the CPU free: what an accelerator sees (its compute is elsewhere)

        def cached_accel():
            b = to_device(next(it), dev)
            targets(b)
            time.sleep(t_c)
        t_b_accel = _timed(cached_accel, steps)
        # loader alone
        it2 = batches(epoch=5)
        n = 0
        t0 = time.perf_counter()
        for _ in range(steps * 2):
            n += len(next(it2)["key"])
        loader_sps = n / (time.perf_counter() - t0)
        row_bytes = sum(v.element_size() * v[0].numel() for k, v in fixed.items() if k in targets.paths.values())
    return "\n".join([
        f"# bench train: teacher {tmeta.model} {tmeta.input_size[1]}px ({t_name}, {'codes ' + quantize if quantize else tmeta.dtype}), "
        f"student {student}, batch {batch_size}, {workers} loader worker(s), {torch.get_num_threads()} torch threads, {dev}",
        "",
        "| step | s/step | samples/s |",
        "|---|---|---|",
        f"| (a) online: teacher forward + student step | {t_a:.3f} | {batch_size / t_a:.1f} |",
        f"| (b) cached: kdcache loader + student step | {t_b:.3f} | {batch_size / t_b:.1f} |",
        f"| (c) student step on in-memory tensors | {t_c:.3f} | {batch_size / t_c:.1f} |",
        "",
        f"speedup a/b = {t_a / t_b:.2f} (ideal a/c = {t_a / t_c:.2f}; a/b is {t_a / t_b / (t_a / t_c):.2f} of ideal, target >= 0.9)",
        f"loader overhead b/c = {t_b / t_c:.2f} (target <= 1.10); on this machine the loader and the student "
        f"share the CPU cores",
        f"loader overhead with the step's compute off the CPU (b'/c, accelerator stand-in: the step is a "
        f"{t_c:.3f} s wait) = {t_b_accel / t_c:.2f}",
        f"loader alone: {loader_sps:.1f} samples/s; target bytes read per sample: {row_bytes} "
        f"(fp32 floats would be {4 * (tmeta.tokens + 1) * tmeta.dim})",
    ])
