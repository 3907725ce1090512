"""A store's cached summary features with their corpus labels: the teacher's kNN ceiling, free.

Labels are the corpus's (webdataset ``cls``, image-folder classes) as the store recorded them at
extraction (``origin``; a store from before: through the same walk extraction used,
``data.walk.align``); features are the stored summary (``cls``) of view 0,
the teacher's eval view, read through the store's verified path (checksums, finiteness). A
corrupt shard stops the evaluation with one line, or with ``skip_corrupt`` is left out and
reported.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.walk import align
from kdcache.errors import KdcacheError, StoreError, one_line
from kdcache.store import Store

from .options import ProbeOptions
from .probes import probe


def labelled_store_features(url: str, data: str | None, *, teacher: str | None = None, skip_corrupt: bool = False,
                            progress: bool = False) -> dict:
    """{x (N, D) float32, y (N,) int, keys, skipped: {shard: error}} over the store's complete shards."""
    store = Store.open(url)
    teacher = teacher or next(iter(store.meta.teachers))
    if teacher not in store.meta.teachers:
        raise KdcacheError(f"--teacher {teacher}: not in {url} (teachers: {', '.join(store.meta.teachers)})")
    if (store.meta.teachers[teacher].quantizer or {}).get("cls") and not store.meta.teachers[teacher].quantizer["cls"].get("keep_float"):
        raise KdcacheError(f"{url}: teacher {teacher}'s summary features are stored as codes; eval reads float cls")
    corpus = resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus)) if data else None
    if corpus is not None and store.meta.corpus.get("fingerprint") != corpus.fingerprint():
        raise KdcacheError(f"{url} was extracted from another corpus than --data {data}")
    shards = corpus.shards if corpus is not None else [_Shard(n) for n in store.complete_shards()]
    xs, ys, keys, skipped, unlabelled = [], [], [], {}, 0
    for shard in tqdm(shards, unit="shard", desc="cached features", disable=not progress, dynamic_ncols=True):
        try:
            attrs = store.shard_attrs(shard.name) or {}
            if attrs.get("complete") is not True:
                raise StoreError(f"{url}: shard {shard.name} is not complete")
            x = store.read_features(shard.name, teacher, "cls", view=0)  # the eval view: in format 2 it alone is read
            labels = stored_labels(store, corpus, shard, attrs)
        except StoreError as e:
            if not skip_corrupt:
                raise
            skipped[shard.name] = one_line(e)
            continue
        for row, (key, label) in enumerate(labels):
            if label is None:
                unlabelled += 1
                continue
            xs.append(x[row])
            ys.append(label)
            keys.append(key)
    if not xs:
        raise KdcacheError(f"{data}: no labelled samples (webdataset 'cls' fields or image-folder classes)")
    return {"x": np.stack(xs).astype(np.float32), "y": np.asarray(ys, dtype=np.int64), "keys": keys, "teacher": teacher,
            "skipped": skipped, "unlabelled": unlabelled}


def stored_labels(store: Store, corpus, shard, attrs: dict) -> list[tuple[str, int | None]]:
    """(key, label or None) of every row of a store shard: from the store's ``origin`` (format 3),
    else from the corpus's walk aligned with the stored keys."""
    origin = store.origin(shard.name)
    keys = store.keys(shard.name).tolist()
    if origin is not None:
        return [(k, None if label < 0 else int(label)) for k, label in zip(keys, origin[:, 3].tolist())]
    if corpus is None:
        raise KdcacheError(f"--data is required: {store.url} was written before stores recorded their labels "
                           f"(store format {store.meta.format})")
    return [(s.key, s.label) for s in align(corpus, shard, keys, attrs.get("failed", []))]


class _Shard:
    """A store shard named without its corpus (the labels come from the store)."""

    def __init__(self, name: str):
        self.name = name


def probe_store(url: str, data: str, options: ProbeOptions = ProbeOptions(), *, teacher: str | None = None,
                skip_corrupt: bool = False, val_store: str | None = None, val_data: str | None = None,
                progress: bool = False) -> dict:
    """``kdcache eval knn|linear --store``: the probe of the cached summary features, with its
    protocol; ``val_store``/``val_data``: a given validation split (another corpus and its store)."""
    f = labelled_store_features(url, data, teacher=teacher, skip_corrupt=skip_corrupt, progress=progress)
    val = None
    if val_store or val_data:
        if not (val_store and val_data):
            raise KdcacheError("--val-store and --val-data go together (the validation corpus and its store)")
        v = labelled_store_features(val_store, val_data, teacher=f["teacher"], skip_corrupt=skip_corrupt, progress=progress)
        val, f["skipped"] = (v["x"], v["y"]), {**f["skipped"], **v["skipped"]}
    r = probe(f["x"], f["y"], f"store {url}, teacher {f['teacher']}, cached summary (view 0, the eval view)",
              resolution=list(Store.open(url).meta.teachers[f["teacher"]].input_size[1:]), options=options, val=val,
              val_name=val_data)
    return {**r, "unlabelled_samples": f["unlabelled"], "skipped_shards": f["skipped"]}
