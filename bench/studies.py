"""What the studies (``bench quality``, ``bench teachers``) share: one variant trained (or reused)
and timed, the bookkeeping that keeps their comparisons fair, and where results land."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.train.config import TrainConfig
from kdcache.train.fit import build_run, fit
from kdcache.train.rundir import kept_json


def train_variant(out: str, *, progress: bool, **config) -> dict:
    """Train one variant (or reuse the finished run in ``out``) and time its training loop
    (``fit``, without building: statistics, counting passes)."""
    def run() -> dict:
        built = build_run(TrainConfig(out=out, overwrite=True, **config), progress=progress)
        t0 = time.perf_counter()
        result = fit(built, progress=progress)
        return {"steps": result["steps"], "fit_seconds": time.perf_counter() - t0, "teacher_images": result["teacher_images"]}
    os.makedirs(out, exist_ok=True)
    return kept_json(os.path.join(out, "quality-run.json"), run)


def record(path: str, make) -> dict:
    """The JSON kept at ``path``, or ``make()`` written there (a resumed study does not redo it)."""
    return kept_json(path, make)


def kfold_scores(x: np.ndarray, y: np.ndarray, *, folds: int, seed: int = 0) -> dict:
    """k-fold kNN and linear probe over every sample: each sample is scored once, by a probe fitted
    on the other folds; the folds are a seeded permutation (the same for every run of a study)."""
    from kdcache.eval.knn import knn_classify
    from kdcache.eval.linear import linear_probe
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), folds)
    knn = linear = 0.0
    for i, va in enumerate(parts):
        tr = np.concatenate([p for j, p in enumerate(parts) if j != i])
        knn += knn_classify(x[tr], y[tr], x[va], y[va])["top1"] * len(va)
        linear += linear_probe(x[tr], y[tr], x[va], y[va], seed=seed)["top1"] * len(va)
    return {"knn": knn / len(y), "linear": linear / len(y), "n": int(len(y)), "folds": folds}


def model_xy(model_data, corpus: str) -> dict:
    """{x, y}: a (model, data config, description)'s features of every labelled image of ``corpus``."""
    from kdcache.eval.model_features import labelled_model_features
    net, data, _ = model_data
    f = labelled_model_features(net, data, corpus)
    return {"x": f["x"], "y": f["y"]}


def run_scores(run: str, corpus: str, *, folds: int) -> dict:
    """A run's exported student scored by ``kfold_scores`` on every labelled image (kept in the run)."""
    from kdcache.eval.model_features import run_student
    return record(os.path.join(run, "quality-scores.json"),
                  lambda: kfold_scores(**model_xy(run_student(run), corpus), folds=folds))


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


def spread(values) -> dict:
    """Mean and sample standard deviation of one row's values (one per seed)."""
    import statistics
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def paired(a, b, *, confidence: float = 0.95) -> dict:
    """The mean of the differences a_i - b_i (paired by seed) with its t-interval; with one pair the
    interval is the point (nothing to estimate a spread from)."""
    import math
    import statistics

    from scipy.stats import t as student_t
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": len(diffs)}
    half = student_t.ppf(0.5 + confidence / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs)}
