"""A store's cached summary features with their corpus labels: the teacher's kNN ceiling, free.

Labels come from the corpus (webdataset ``cls``, image-folder classes) through the same walk
extraction used (``data.walk.align``); features are the stored summary (``cls``) of view 0,
the teacher's eval view, read through the store's verified path (checksums, finiteness). A
corrupt shard stops the evaluation with one line, or with ``skip_corrupt`` is left out and
reported.
"""
from __future__ import annotations

import numpy as np

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.walk import align
from kdcache.store import KdcacheError, Store, StoreError
from kdcache.store.errors import one_line


def labelled_store_features(url: str, data: str, *, teacher: str | None = None, skip_corrupt: bool = False) -> dict:
    """{x (N, D) float32, y (N,) int, keys, skipped: {shard: error}} over the store's complete shards."""
    store = Store.open(url)
    teacher = teacher or next(iter(store.meta.teachers))
    if teacher not in store.meta.teachers:
        raise KdcacheError(f"--teacher {teacher}: not in {url} (teachers: {', '.join(store.meta.teachers)})")
    if (store.meta.teachers[teacher].quantizer or {}).get("cls") and not store.meta.teachers[teacher].quantizer["cls"].get("keep_float"):
        raise KdcacheError(f"{url}: teacher {teacher}'s summary features are stored as codes; eval reads float cls")
    corpus = resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus))
    if store.meta.corpus.get("fingerprint") != corpus.fingerprint():
        raise KdcacheError(f"{url} was extracted from another corpus than --data {data}")
    xs, ys, keys, skipped, unlabelled = [], [], [], {}, 0
    for shard in corpus.shards:
        try:
            attrs = store.shard_attrs(shard.name) or {}
            if attrs.get("complete") is not True:
                raise StoreError(f"{url}: shard {shard.name} is not complete")
            x = store.read_features(shard.name, teacher, "cls")[:, 0]
            rows = list(align(corpus, shard, store.keys(shard.name).tolist(), attrs.get("failed", [])))
        except StoreError as e:
            if not skip_corrupt:
                raise
            skipped[shard.name] = one_line(e)
            continue
        for row, s in rows:
            if s.label is None:
                unlabelled += 1
                continue
            xs.append(x[row])
            ys.append(s.label)
            keys.append(s.key)
    if not xs:
        raise KdcacheError(f"{data}: no labelled samples (webdataset 'cls' fields or image-folder classes)")
    return {"x": np.stack(xs).astype(np.float32), "y": np.asarray(ys, dtype=np.int64), "keys": keys, "teacher": teacher,
            "skipped": skipped, "unlabelled": unlabelled}


def knn_on_store(url: str, data: str, *, teacher: str | None = None, skip_corrupt: bool = False,
                 val_store: str | None = None, val_data: str | None = None, **knn) -> dict:
    """``kdcache eval knn --store``: kNN accuracy of the cached summary features, with its protocol;
    ``val_store``/``val_data``: a given validation split (another corpus and its store)."""
    f = labelled_store_features(url, data, teacher=teacher, skip_corrupt=skip_corrupt)
    val = None
    if val_store or val_data:
        if not (val_store and val_data):
            raise KdcacheError("--val-store and --val-data go together (the validation corpus and its store)")
        v = labelled_store_features(val_store, val_data, teacher=f["teacher"], skip_corrupt=skip_corrupt)
        val, f["skipped"] = (v["x"], v["y"]), {**f["skipped"], **v["skipped"]}
    r = knn_report(f["x"], f["y"], f"store {url}, teacher {f['teacher']}, cached summary (view 0, the eval view)",
                   resolution=list(Store.open(url).meta.teachers[f["teacher"]].input_size[1:]), val=val,
                   val_name=val_data, **knn)
    return {**r, "unlabelled_samples": f["unlabelled"], "skipped_shards": f["skipped"]}


def knn_report(x, y, features: str, *, resolution, k: int = 20, temperature: float = 0.07, val_fraction: float = 0.2,
               seed: int = 0, probe: str = "knn", val=None, val_name: str | None = None) -> dict:
    """kNN (or the linear probe, ``probe="linear"``) on labelled features with a seeded split (or
    ``val = (x_val, y_val)``: a given validation set), and the exact protocol to reproduce it."""
    from .knn import knn_classify, seeded_split
    from .linear import linear_probe
    if val is not None:
        xv, yv = val
        x, y = np.concatenate([x, xv]), np.concatenate([y, yv])
        tr, va = np.arange(len(y) - len(yv)), np.arange(len(y) - len(yv), len(y))
        split = {"split": f"given: every sample of the training corpus for training, every sample of {val_name} for "
                          f"validation", "seed": seed, "view": "eval view (centred crop_pct box)", "resolution": resolution}
    else:
        tr, va = seeded_split(len(y), val_fraction=val_fraction, seed=seed)
        split = {"split": f"seeded permutation of the samples in corpus order, last {val_fraction:g} for validation",
                 "seed": seed, "view": "eval view (centred crop_pct box)", "resolution": resolution}
    if probe == "linear":
        result = linear_probe(x[tr], y[tr], x[va], y[va], seed=seed)
        protocol = {**split, "probe": "logistic regression on standardised features, C chosen on a seeded quarter of "
                                      "the training split from a log grid 1e-3..1e2, refitted on all of it"}
    else:
        result = knn_classify(x[tr], y[tr], x[va], y[va], k=k, temperature=temperature)
        protocol = {**split, "probe": "kNN", "k": result["k"], "temperature": temperature, "similarity": "cosine"}
    return {"features": features, **result, "protocol": protocol, "skipped_shards": {}}


def format_knn(r: dict) -> str:
    how = f"k={r['k']}, T={r['temperature']}" if "k" in r else f"linear probe, C={r['C']:g}"
    lines = [f"# {'kNN' if 'k' in r else 'linear probe'}: {r['features']}",
             f"{how}, {r['n_train']} train / {r['n_val']} val samples, {r['classes']} classes, split seed {r['protocol']['seed']}",
             "", "| top-1 | top-5 |", "|---|---|", f"| {r['top1']:.4f} | {r['top5']:.4f} |"]
    if r["skipped_shards"]:
        lines.append(f"skipped corrupt shards: {', '.join(f'{s} ({e})' for s, e in r['skipped_shards'].items())}")
    return "\n".join(lines)
