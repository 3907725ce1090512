"""``kdcache bench train``: what caching buys, measured in one run on the same batches.

(a) online distillation: teacher forward + student step, per batch;
(b) cached targets: the kdcache loader (decode, crop replay, stored targets) + device-side
    target decoding + student step;
(c) student step alone on in-memory tensors (the floor).
Reports a/b (the speedup), b/c (loader overhead, target <= 1.10), a/c (the ideal speedup),
loader samples/s with the student removed, and target bytes read per sample.
"""
from __future__ import annotations

import dataclasses
import json
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

from .harness import environment, header, limit_note, measure


class _Epochs(DistillStream):
    def __iter__(self):
        while True:
            yield from super().__iter__()
            self.epoch += 1


def bench_train(*, teacher: str, student: str, images: int = 96, batch_size: int = 16, steps: int = 6, workers: int = 1,
                quantize: str | None = None, repeat: int = 5, as_json: bool = False) -> str:
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

        def batches(epoch=0, workers=workers):
            # epochs back to back in the same workers: this corpus is a few batches long, and a
            # worker start per epoch (which real epochs amortise) would dominate the timing
            spec = dataclasses.replace(run.dataset.spec, workers=workers)
            yield from DataLoader(_Epochs(run.corpus, spec, epoch=epoch), batch_size=batch_size,
                                  num_workers=workers, collate_fn=collate, drop_last=True, pin_memory=dev.type == "cuda",
                                  prefetch_factor=4 if workers else None)

        # (c) in-memory: one real batch, decoded targets held on the device
        fixed = to_device(next(batches()), dev)
        fixed_t = {k: v.detach() for k, v in targets(fixed).items()}
        # (a) online: the teacher runs on every batch (on its own view of the same images)
        tch = create_teacher(teacher, device=dev)
        t_in = tuple(tch.meta.input_size[1:])
        teacher_imgs = torch.nn.functional.interpolate(fixed["image"].float(), size=t_in, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
        # the loader alone runs in this process: a worker would prefetch while the other sides run
        it, it_alone = batches(), batches(epoch=5, workers=0)
        c_step = [0.0]  # the last (c) step time: what (b') waits instead of computing

        def side(fn):
            def run():
                for _ in range(steps):
                    fn()
                return steps * batch_size
            return run

        def online():
            summary, patches = tch.features(teacher_imgs)
            with torch.no_grad():
                tgt = {"summary": targets.norm["cls"](summary), "patch": targets.norm["patch"](patches)}
            step(fixed["image"], tgt)

        def cached():
            b = to_device(next(it), dev)
            step(b["image"], targets(b))

        def student_only():
            t0 = time.perf_counter()
            step(fixed["image"], fixed_t)
            c_step[0] = time.perf_counter() - t0

        def cached_accel():
            # (b') the same loader and device-side decoding, with the student step replaced by an
            # equal wait that leaves the CPU free: what an accelerator sees (its compute is elsewhere)
            b = to_device(next(it), dev)
            targets(b)
            time.sleep(c_step[0])

        def loader_alone():
            next(it_alone)

        sides = {"a": side(online), "b": side(cached), "c": side(student_only), "b'": side(cached_accel),
                 "loader": side(loader_alone)}
        m = measure(sides, repeat=repeat)
        row_bytes = sum(v.element_size() * v[0].numel() for k, v in fixed.items() if k in targets.paths.values())
    env = environment(str(dev))
    speedup, ideal, overhead, accel = m.ratio("b", "a"), m.ratio("c", "a"), m.ratio("c", "b"), m.ratio("c", "b'")
    of_ideal = m.ratio("b", "c")  # (a/b) / (a/c): the cached step's speed as a fraction of the student alone
    if as_json:
        return json.dumps({"environment": env, "teacher": tmeta.model, "student": student, "batch_size": batch_size,
                           "steps": steps, "workers": workers, "quantize": quantize, "measurement": m.to_dict(),
                           "ratios": {"a/b": speedup.to_dict(), "a/c": ideal.to_dict(), "b/c": overhead.to_dict(),
                                      "b'/c": accel.to_dict(), "of_ideal": of_ideal.to_dict()},
                           "target_bytes_per_sample": row_bytes}, indent=2)
    notes = [n for n in (limit_note(of_ideal, "cached/student-only speed"),) if n]
    return "\n".join([
        header(f"bench train: teacher {tmeta.model} {tmeta.input_size[1]}px ({t_name}, "
               f"{'codes ' + quantize if quantize else tmeta.dtype}), student {student}, batch {batch_size}, "
               f"{workers} loader worker(s), {steps} steps per repetition", env, repeat=repeat, warmup=m.warmup),
        "",
        "| side | s/step | samples/s |",
        "|---|---|---|",
        *[f"| {label} | {m.time(k).fmt(3, 1 / steps)} | {m.rate(k).fmt(1)} |" for k, label in (
            ("a", "(a) online: teacher forward + student step"), ("b", "(b) cached: kdcache loader + student step"),
            ("c", "(c) student step on in-memory tensors"),
            ("b'", "(b') cached, the step's compute replaced by an equal wait (accelerator stand-in)"),
            ("loader", "loader alone, in process (one core, no prefetch)"))],
        "",
        f"speedup a/b = {speedup.fmt()} (ideal a/c = {ideal.fmt()}; b is {of_ideal.fmt()} of c's speed, target >= 0.9)",
        f"loader overhead b/c = {overhead.fmt()} (target <= 1.10); on this machine the loader and the student share the CPU",
        f"loader overhead with the step's compute off the CPU, b'/c = {accel.fmt()}",
        f"target bytes read per sample: {row_bytes} (fp32 floats would be {4 * (tmeta.tokens + 1) * tmeta.dim})",
        *notes,
    ])
