"""``kdcache store pixels``: give a store its views' pixels, from its corpus, without any teacher.

One decode pass: every complete shard that lacks them is read back from the corpus (exactly its
stored samples, through the walk extraction used), each stored view replayed with the decode the
store records, resized to the pixel size and encoded as ``extract --pixels`` would have (JPEG or
raw); the arrays are written beside the shard's others, and its digest and checksums updated in
one metadata write, last, under the shard's lease. An interrupted run resumes: shards that got
their pixels are skipped. Decoding and encoding run in DataLoader workers.
"""
from __future__ import annotations

import os
import time

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.pixels import Crop
from kdcache.errors import KdcacheError, StoreError
from kdcache.store import Store
from kdcache.store.inspect import write_summary
from kdcache.store.lease import LEASE_SECONDS, new_owner
from kdcache.store.meta import PIXELS_JPEG, PIXELS_RAW, PixelSpec, has_pixels

from .batches import LeaseSpec, Replay, ShardBatches, ShardJob


def add_pixels(url: str, data: str, pixels: str | None = None, *, workers: int = 1, batch_size: int = 32,
               progress: bool = True) -> dict:
    """Add ``pixels`` (``[SIZE][:jpeg[QUALITY]|:raw]``; default: the largest teacher input, JPEG) to
    every complete shard of ``url`` that has none; a store that keeps pixels already keeps its spec."""
    store = Store.open(url, writable=True)
    meta = store.meta
    if meta.format < 3:
        raise KdcacheError(f"{url}: store format {meta.format} keeps no pixels; copy it to format 3 first "
                           f"(kdcache store copy {url} NEW --format 3)")
    corpus = resolve_corpus(data, ReadOptions.from_dict(meta.corpus))
    if meta.corpus.get("fingerprint") != corpus.fingerprint():
        raise KdcacheError(f"{url} was extracted from corpus {meta.corpus.get('spec')!r}; --data {data!r} is another")
    first = next(iter(meta.teachers.values()))
    largest = max((tuple(t.input_size[1:]) for t in meta.teachers.values()), key=lambda hw: hw[0] * hw[1])
    try:
        spec = PixelSpec.parse(pixels or "", default_size=largest, interpolation=first.interpolation)
    except StoreError as e:
        raise KdcacheError(str(e)) from None
    if meta.pixels is not None and pixels is not None and meta.pixels != spec:
        raise KdcacheError(f"{url} keeps pixels as {meta.pixels.to_dict()} already; this asks for {spec.to_dict()}")
    spec = meta.pixels or spec
    if meta.pixels is None:
        store.write_meta(meta.replace(pixels=spec))
    jobs = []
    for shard in corpus.shards:
        attrs = store.shard_attrs(shard.name) or {}
        if attrs.get("complete") is True and not has_pixels(attrs.get("digest", {})):
            jobs.append(ShardJob(shard, (), replay=Replay(store.keys(shard.name).tolist(), store.views(shard.name),
                                                          list(attrs.get("failed", []))), pixels=True))
    done = len([s for s in store.complete_shards() if has_pixels((store.shard_attrs(s) or {}).get("digest", {}))])
    if not jobs:
        return {"store": url, "pixels": spec.to_dict(), "shards_written": 0, "shards_already_there": done}
    owner = new_owner()
    leases = store.leases(owner, pid=os.getpid())
    dataset = ShardBatches(corpus, jobs, policy=store.meta.view_policy, groups=[Crop(spec.size, spec.interpolation)],
                           batch_size=batch_size, decode=corpus.options.decode, pixels=(spec, 0),
                           lease=LeaseSpec(store.url, owner, LEASE_SECONDS, os.getpid()))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    writers, written, moved_on = {}, [], []
    bar = tqdm(total=len(jobs), unit="shard", desc="store pixels", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            if batch.moved_on is not None:
                moved_on.append(batch.shard)
                bar.update(1)
                continue
            w = writers.get(batch.shard) or writers.setdefault(batch.shard, store.extend_shard(batch.shard, {}, pixels=True))
            if len(batch):
                w.append({PIXELS_RAW if isinstance(batch.pixels, np.ndarray) else PIXELS_JPEG: batch.pixels})
            if batch.last:
                w.finish()  # the pixels' digests and checksums join the shard's, in one write
                del writers[batch.shard]
                leases.release(batch.shard)
                written.append(batch.shard)
                bar.update(1)
    finally:
        bar.close()
        for name in list(writers):  # unfinished: their arrays are not in the digest, the next run redoes them
            leases.release(name)
    write_summary(store)
    return {"store": url, "pixels": spec.to_dict(), "shards_written": len(written), "shards_already_there": done,
            "shards_left_to_another_job": moved_on, "seconds": round(time.perf_counter() - t0, 2)}
