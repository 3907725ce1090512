"""The measurement harness every ``kdcache bench`` uses: warm-up, repeated, interleaved sides.

A single pass per side lets machine drift decide a ratio. Here each side runs once as warm-up,
then ``repeat`` rounds in which every side runs once, in a fixed interleaved order (A B C A B C
...), so drift hits all sides alike. Every figure is reported as its median with min-max; a
ratio between two sides is computed round by round (side A of round i against side B of round
i) and reported as the median of those ratios with their spread. ``Measurement.to_dict``
keeps every repetition and the order they ran in.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, digits: int = 2, scale: float = 1.0) -> str:
        m, lo, hi = self.median * scale, self.low * scale, self.high * scale
        return f"{m:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high}


@dataclass(frozen=True)
class Timed:
    """What a side returns when it times itself (e.g. the pipeline loop without its set-up)."""

    items: float
    seconds: float


@dataclass
class Measurement:
    """Seconds per repetition of each side, in run order; ``items`` per repetition for rates."""

    seconds: dict[str, list[float]]
    items: dict[str, float]
    order: list[str] = field(default_factory=list)  # every timed run, in the order it ran
    warmup: int = 1

    def time(self, side: str) -> Spread:
        return Spread.of(self.seconds[side])

    def rate(self, side: str) -> Spread:
        """items per second, per repetition."""
        return Spread.of([self.items[side] / s for s in self.seconds[side]])

    def ratio(self, num: str, den: str, *, of: str = "rate") -> Spread:
        """Round-by-round ratio of two sides' rates (or times, ``of="time"``)."""
        a, b = self.seconds[num], self.seconds[den]
        if of == "time":
            return Spread.of([x / y for x, y in zip(a, b)])
        return Spread.of([(self.items[num] / x) / (self.items[den] / y) for x, y in zip(a, b)])

    def to_dict(self) -> dict:
        return {"warmup": self.warmup, "repeat": len(next(iter(self.seconds.values()))), "order": self.order,
                "seconds": self.seconds, "items": self.items,
                "rate": {s: self.rate(s).to_dict() for s in self.seconds}}


def lasting(run: Callable[[], object], seconds: float) -> Callable[[], object]:
    """``run`` (one pass, e.g. one epoch, returning the items it processed, or a ``Timed``)
    repeated within each call until a call lasts about ``seconds``: the count is set on the first
    call (``measure``'s warm-up), from its second pass (its first also starts what persists: a
    DataLoader's workers), and every later call makes exactly that many passes, so each timed run
    of a side does the same work; ``Timed`` passes add up. Short passes (a 60 ms epoch) are then
    not timed one by one against a clock and a machine's hiccups."""
    passes: list[int] = []

    def call():
        if passes:
            return _summed([run() for _ in range(passes[0])])
        first = run()
        t0 = time.perf_counter()
        second = run()
        took = second.seconds if isinstance(second, Timed) else time.perf_counter() - t0
        passes.append(max(1, math.ceil(seconds / max(took, 1e-9))))
        return _summed([first, second])
    call.passes = passes  # (read by reports: [count] once set)
    return call


def _summed(results: list):
    if results and all(isinstance(r, Timed) for r in results):
        return Timed(sum(r.items for r in results), sum(r.seconds for r in results))
    return sum(r for r in results if isinstance(r, (int, float)))


def measure(sides: dict[str, Callable[[], object]], *, repeat: int = 5, warmup: int = 1,
            items: dict[str, float] | None = None, clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Run every side ``warmup`` times, then ``repeat`` interleaved rounds; time each run.

    A side may return a number: the items it processed in that run (else ``items[side]``, else 1),
    or a ``Timed``: its own items and seconds (the part of the run it is about).
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    seconds = {name: [] for name in sides}
    counted: dict[str, float] = dict(items or {})
    order = []
    for _ in range(repeat):
        for name, fn in sides.items():
            t0 = clock()
            n = fn()
            elapsed = clock() - t0
            if isinstance(n, Timed):
                n, elapsed = n.items, n.seconds
            seconds[name].append(elapsed)
            order.append(name)
            if isinstance(n, (int, float)) and not isinstance(n, bool):
                counted[name] = float(n)
    return Measurement(seconds, {name: counted.get(name, 1.0) for name in sides}, order, warmup)


def environment(device: str = "cpu") -> dict:
    """What the numbers were measured on: printed as every bench's header."""
    import timm
    import torch
    import zarr

    from kdcache.quantize.methods import faiss
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "torch": torch.__version__, "timm": timm.__version__, "zarr": zarr.__version__, "faiss": faiss.__version__ if faiss else None,
            "load_1m_at_start": round(load[0], 2)}


def header(title: str, env: dict, *, repeat: int, warmup: int) -> str:
    return (f"# {title}\n"
            f"{env['cpus']} CPUs, {env['torch_threads']} torch threads, device {env['device']}; torch {env['torch']}, "
            f"timm {env['timm']}, zarr {env['zarr']}, faiss {env['faiss']}; load {env['load_1m_at_start']} at start; "
            f"{warmup} warm-up + {repeat} interleaved repetitions, median (min-max)")


def limit_note(ratio: Spread, what: str) -> str:
    """A pipeline cannot beat its own bare baseline: say so when the median does anyway."""
    if ratio.median > 1.0:
        return (f"note: {what} median {ratio.median:.2f} > 1: the pipeline measured faster than its baseline, "
                f"which is noise (spread {ratio.low:.2f}-{ratio.high:.2f}), not a real gain")
    return ""


def files_under(root: str) -> list[str]:
    """Every file below ``root`` (what a bench measures the bytes of, or evicts from the page cache)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def loader_cpu_seconds(loader) -> float | None:
    """CPU seconds used so far by this process (every thread) and the loader's live workers (Linux's
    ``/proc``; None elsewhere, or before the workers started). A side's CPU per sample is what it
    costs on a machine with a core for every worker and thread: the ratio that a 2-core machine's
    samples/s cannot show once one worker keeps both cores busy."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None)
    if loader.num_workers and not workers:
        return None
    total = time.process_time()
    for w in workers or ():
        try:
            with open(f"/proc/{w.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
