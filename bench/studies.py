"""What the studies (``bench quality``, ``bench teachers``) share: one variant trained (or reused)
and timed, the bookkeeping that keeps their comparisons fair, and where results land."""
from __future__ import annotations

import json
import os
import time

from kdcache.errors import KdcacheError
from kdcache.train.config import TrainConfig
from kdcache.train.fit import build_run, fit


def train_variant(out: str, *, progress: bool, **config) -> dict:
    """Train one variant (or reuse the finished run in ``out``) and time its training loop
    (``fit``, without building: statistics, counting passes)."""
    done = os.path.join(out, "quality-run.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    run = build_run(TrainConfig(out=out, overwrite=True, **config), progress=progress)
    t0 = time.perf_counter()
    result = fit(run, progress=progress)
    r = {"steps": result["steps"], "fit_seconds": time.perf_counter() - t0}
    with open(done, "w") as f:
        json.dump(r, f)
    return r


def write_study(out: str, name: str, result: dict, text: str) -> dict:
    """OUT/NAME.json (every number) and OUT/NAME.md (the table)."""
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    return result


def same_steps(rows: list[dict]) -> int:
    steps = {r["steps"] for r in rows}
    if len(steps) != 1:
        raise KdcacheError(f"variants trained different numbers of steps ({sorted(steps)}): the comparison is void")
    return steps.pop()


def knn_protocol(knn: dict) -> dict:
    p = knn["protocol"]
    return {"k": p["k"], "temperature": p["temperature"], "n_train": knn["n_train"], "n_val": knn["n_val"],
            "classes": knn["classes"], "split_seed": p["seed"]}
