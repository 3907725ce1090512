"""``kdcache eval knn|linear``: a probe of one set of summary features, with the exact protocol.

The features are a store's cached summary features (the teacher's ceiling, free:
``store_features``), a run's student or any timm model run live on the eval view
(``model_features``). The split is seeded (``val_fraction`` of the samples held out) or given
(every sample of a validation corpus). The result carries everything needed to reproduce it.
"""
from __future__ import annotations

import numpy as np

from kdcache.errors import KdcacheError

from .options import ProbeOptions


def probe(x: np.ndarray, y: np.ndarray, features: str, *, resolution, options: ProbeOptions = ProbeOptions(),
          val=None, val_name: str | None = None) -> dict:
    """kNN (or the linear probe) on labelled features with a seeded split (or ``val = (x_val,
    y_val)``: a given validation set), and the exact protocol to reproduce it."""
    from .knn import knn_classify, seeded_split
    from .linear import linear_probe
    seed = options.seed
    if val is not None:
        xv, yv = val
        x, y = np.concatenate([x, xv]), np.concatenate([y, yv])
        tr, va = np.arange(len(y) - len(yv)), np.arange(len(y) - len(yv), len(y))
        split = {"split": f"given: every sample of the training corpus for training, every sample of {val_name} for "
                          f"validation", "seed": seed, "view": "eval view (centred crop_pct box)", "resolution": resolution}
    else:
        tr, va = seeded_split(len(y), val_fraction=options.val_fraction, seed=seed)
        split = {"split": f"seeded permutation of the samples in corpus order, last {options.val_fraction:g} for validation",
                 "seed": seed, "view": "eval view (centred crop_pct box)", "resolution": resolution}
    if options.probe == "linear":
        result = linear_probe(x[tr], y[tr], x[va], y[va], seed=seed)
        protocol = {**split, "probe": "logistic regression on standardised features, C chosen on a seeded quarter of "
                                      "the training split from a log grid 1e-3..1e2, refitted on all of it"}
    else:
        result = knn_classify(x[tr], y[tr], x[va], y[va], k=options.k, temperature=options.temperature)
        protocol = {**split, "probe": "kNN", "k": result["k"], "temperature": options.temperature, "similarity": "cosine"}
        if result["k"] != options.k:  # every training sample votes: said, in the result and the table
            protocol["k_asked"] = options.k
    return {"features": features, **result, "protocol": protocol, "skipped_shards": {}}


def evaluate(options: ProbeOptions, data: str | None, *, store: str | None = None, run: str | None = None,
             ema: bool = False, model: str | None = None, teacher: str | None = None, val_data: str | None = None,
             val_store: str | None = None, skip_corrupt: bool = False, progress: bool = False,
             images: str | None = None) -> dict:
    """The probe of exactly one of ``store``, ``run``, ``model`` on corpus ``data`` (or without one: a
    store's recorded labels, and for a live model the view pixels of store ``images``)."""
    if sum(x is not None for x in (store, run, model)) != 1:
        raise KdcacheError("give exactly one of --store, --run, --model")
    if val_store and not store:
        raise KdcacheError("--val-store goes with --store (the cached features of --val-data)")
    if store:
        from .store_features import probe_store
        return probe_store(store, data, options, teacher=teacher, skip_corrupt=skip_corrupt, val_store=val_store,
                           val_data=val_data, progress=progress)
    from .model_features import probe_model
    return probe_model("run" if run else "model", data, options, run=run, ema=ema, model=model, val_data=val_data,
                       progress=progress, images=images)


def format_probe(r: dict) -> str:
    how = f"k={r['k']}, T={r['temperature']}" if "k" in r else f"linear probe, C={r['C']:g}"
    if "k_asked" in r["protocol"]:
        how += f" (--k {r['protocol']['k_asked']} asked: more than the {r['n_train']} training samples, so all of them vote)"
    lines = [f"# {'kNN' if 'k' in r else 'linear probe'}: {r['features']}",
             f"{how}, {r['n_train']} train / {r['n_val']} val samples, {r['classes']} classes, split seed {r['protocol']['seed']}",
             "", "| top-1 | top-5 |", "|---|---|", f"| {r['top1']:.4f} | {r['top5']:.4f} |"]
    if r["skipped_shards"]:
        lines.append(f"skipped corrupt shards: {', '.join(f'{s} ({e})' for s, e in r['skipped_shards'].items())}")
    if r.get("skipped_samples"):
        lines.append(f"skipped samples (did not decode, or broke the key rules): {r['skipped_samples']}")
    return "\n".join(lines)
