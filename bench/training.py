"""``kdcache bench train``: what caching buys, measured in one run on the same batches.

Every side steps the trainer ``kdcache train`` uses (``train.trainer.Trainer``, built by
``train.fit.build_run``):

(a) online distillation (``train --online``): the live teacher's forward + the student step, on
    one batch of the online stream held in memory;
(b) cached targets: the kdcache loader (decode, crop replay, stored targets) + device-side
    target decoding + the student step;
(c) the student step alone on in-memory tensors with decoded targets (the floor).
Reports a/b (the speedup), b/c (loader overhead, target <= 1.10), a/c (the ideal speedup),
loader samples/s with the student removed, and target bytes read per sample.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time

import torch

from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.train.config import TrainConfig
from kdcache.train.fit import build_run
from kdcache.data.stream import SampleStream
from kdcache.data.transport import release_batch, training_loader
from kdcache.train.trainer import to_device

from .harness import environment, header, limit_note, measure
from .options import TrainBench


class _Epochs(SampleStream):
    """Epochs back to back, in one ``iter`` (the bench's corpus is a few batches long)."""

    def __iter__(self):
        while True:
            yield from super().__iter__()
            self.set_epoch(self.epoch + 1)


def bench_train(o: TrainBench = TrainBench()) -> str:
    teacher, student, images, batch_size, steps, workers = o.teacher, o.student, o.images, o.batch_size, o.steps, o.workers
    quantize, repeat, as_json = o.quantize, o.repeat, o.as_json
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir, store_url = f"{tmp}/corpus", f"{tmp}/store.zarr"
        build_demo_corpus(corpus_dir, digits=0, photos=images, shard_size=max(batch_size, images // 4))
        extract(corpus_dir, store_url, [teacher], ExtractOptions(progress=False, quantize=quantize, batch_size=batch_size,
                                                                  quantize_sample=4096, quantize_pool=1))
        common = dict(data=corpus_dir, student=student, batch_size=batch_size, workers=workers, lr=1e-4, head_hidden=512,
                      shuffle_buffer=64, amp=o.amp)
        # the trainer's own builder: the same student, heads, targets, loader and step as `kdcache train`
        run = build_run(TrainConfig(store=store_url, out=f"{tmp}/run", **common), progress=False)
        online = build_run(TrainConfig(store="", online=True, teachers=(teacher,), out=f"{tmp}/online",
                                       online_stats_images=min(images, 64), **{**common, "workers": 0}), progress=False)
        trainer, source = run.trainer, run.source
        t_name, dev = source.teachers[0], trainer.device
        tmeta = source.store.meta.teachers[t_name]

        def batches(epoch=0, workers=workers):
            # epochs back to back in the same workers: this corpus is a few batches long, and a
            # worker start per epoch (which real epochs amortise) would dominate the timing
            spec = dataclasses.replace(source.dataset.spec, workers=workers)
            yield from training_loader(_Epochs(spec, source.corpus, epoch=epoch), batch_size=batch_size, workers=workers,
                                       pin_memory=dev.type == "cuda")

        # (c) in-memory: one real batch, decoded targets held on the device
        fixed = to_device(next(batches()), dev)
        with torch.no_grad():
            fixed_t = trainer.decode(fixed)
        # (a) online: one batch of the online stream (student's and teacher's crops), held in memory
        online_batch = to_device(next(iter(online.loader())), online.trainer.device)
        # the loader alone runs in this process: a worker would prefetch while the other sides run
        it, it_alone = batches(), batches(epoch=5, workers=0)
        c_step = [0.0]  # the last (c) step time: what (b') waits instead of computing

        def side(fn):
            def run_steps():
                for _ in range(steps):
                    fn()
                return steps * batch_size
            return run_steps

        def online_step():
            online.trainer.step(online_batch)  # the live teacher runs inside, as in `train --online`

        def cached():
            batch = next(it)
            trainer.step(batch)
            release_batch(batch)

        def student_only():
            t0 = time.perf_counter()
            trainer.update(fixed["image"], fixed_t)
            c_step[0] = time.perf_counter() - t0

        def cached_accel():
            # (b') the same loader and device-side decoding, with the student step replaced by an
            # equal wait that leaves the CPU free: what an accelerator sees (its compute is elsewhere)
            batch = next(it)
            with torch.no_grad():
                trainer.decode(to_device(batch, dev))
            release_batch(batch)
            time.sleep(c_step[0])

        def loader_alone():
            release_batch(next(it_alone))

        sides = {"a": side(online_step), "b": side(cached), "c": side(student_only), "b'": side(cached_accel),
                 "loader": side(loader_alone)}
        m = measure(sides, repeat=repeat)
        paths = trainer.targets[t_name].paths.values()
        row_bytes = sum(v.element_size() * v[0].numel() for k, v in fixed.items() if k in paths)
    env = environment(str(dev))
    speedup, ideal, overhead, accel = m.ratio("b", "a"), m.ratio("c", "a"), m.ratio("c", "b"), m.ratio("c", "b'")
    of_ideal = m.ratio("b", "c")  # (a/b) / (a/c): the cached step's speed as a fraction of the student alone
    if as_json:
        return json.dumps({"environment": env, "teacher": tmeta.model, "student": student, "batch_size": batch_size,
                           "autocast": "bf16" if trainer.autocast else "off",
                           "steps": steps, "workers": workers, "quantize": quantize, "measurement": m.to_dict(),
                           "ratios": {"a/b": speedup.to_dict(), "a/c": ideal.to_dict(), "b/c": overhead.to_dict(),
                                      "b'/c": accel.to_dict(), "of_ideal": of_ideal.to_dict()},
                           "target_bytes_per_sample": row_bytes}, indent=2)
    notes = [n for n in (limit_note(of_ideal, "cached/student-only speed"),) if n]
    return "\n".join([
        header(f"bench train: teacher {tmeta.model} {tmeta.input_size[1]}px ({t_name}, "
               f"{'codes ' + quantize if quantize else tmeta.dtype}), student {student} (autocast "
               f"{'bf16' if trainer.autocast else 'off'}), batch {batch_size}, "
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
