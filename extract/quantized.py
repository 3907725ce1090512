"""``kdcache extract --quantize``: the quantizer is trained on the first shards, then codes.

Phase 1 (rank 0) writes the corpus-order prefix of shards in float, as plain extraction does,
until it holds enough tokens (the same prefix rule ``kdcache quantize`` applies to a finished
store, so both paths train on the same sample and give the same codes). The quantizer is
trained and stored; those shards are converted; every later shard is encoded in the writer
thread from the storage-dtype values (exactly what conversion would read back). Other ranks
wait for the quantizer to appear. Resumable at every step: the quantizer is written once,
atomically, and shards keep their own completion.
"""
from __future__ import annotations

import logging
import time

from kdcache.quantize import QuantizerSpec, SampleSpec, convert_shard, train_quantizer
from kdcache.quantize.convert import encode_rows
from kdcache.quantize.sample import training_prefix
from kdcache.store import KdcacheError, Store
from kdcache.store.codes import Codebooks, read_codebooks

log = logging.getLogger("kdcache.extract")
WAIT_SECONDS = 24 * 3600
KIND = "patch"  # CLS stays float during extraction (small); `kdcache quantize --tokens cls` converts it


def stored_quantizers(store: Store) -> dict[str, Codebooks]:
    """Codebooks of every teacher whose patch features the store keeps as codes."""
    return {t: cb for t, m in store.meta.teachers.items() if (m.quantizer or {}).get(KIND)
            for cb in [read_codebooks(store.root, t, KIND)] if cb is not None}


def _keep_float(store: Store, teacher: str) -> bool:
    return bool(store.meta.teachers[teacher].quantizer[KIND].get("keep_float"))


def ensure_quantizers(store: Store, corpus, teachers, opts, *, rank: int, extract_shards) -> dict[str, Codebooks]:
    """Codebooks per command teacher, training them first when the store has none."""
    qspec = QuantizerSpec.parse(opts.quantize)
    sspec = SampleSpec(train_tokens=opts.quantize_sample, seed=opts.seed, pool=opts.quantize_pool)
    found = {t: read_codebooks(store.root, t, KIND) for t in teachers}
    for t, cb in found.items():
        if cb is not None and cb.attrs.get("spec") != qspec.key(store.meta.teachers[t].dim):
            raise KdcacheError(f"--quantize {opts.quantize}: teacher {t} in {store.url} is already quantized with {cb.attrs.get('spec')}")
    need = [t for t, cb in found.items() if cb is None]
    if need and rank != 0:
        return _wait_for(store, list(teachers))
    if need:
        names = [s.name for s in corpus.shards]
        while True:
            prefix = _complete_prefix(store, names, list(store.meta.teachers))
            enough = {t: training_prefix(store, t, KIND, sspec, shards=prefix) for t in need}
            if all(ok for _, ok in enough.values()) or len(prefix) == len(names):
                break
            nxt = names[len(prefix):len(prefix) + max(1, opts.workers)]
            log.info("quantizer training sample: extracting %s in float first", ", ".join(nxt))
            extract_shards([corpus.shard(n) for n in nxt])
        for t in need:
            found[t] = train_quantizer(store, t, KIND, qspec, sspec, shards=enough[t][0], keep_float=opts.keep_float)
            log.info("teacher %s: %s, held-out mean cos %.4f, relMSE %.4f", t, found[t].attrs["spec"],
                     found[t].attrs.get("mean_cos", float("nan")), found[t].attrs.get("relmse", float("nan")))
    return found


def _complete_prefix(store: Store, names: list[str], teachers: list[str]) -> list[str]:
    out = []
    for n in names:
        if not store.is_complete(n, teachers):
            break
        out.append(n)
    return out


def _wait_for(store: Store, teachers: list[str]) -> dict[str, Codebooks]:
    log.info("waiting for rank 0 to train the quantizer(s) of %s", ", ".join(teachers))
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        found = {t: read_codebooks(store.root, t, KIND) for t in teachers}
        if all(cb is not None for cb in found.values()):
            reopened = Store.open(store.url, writable=True)
            store.meta = reopened.meta
            return found
        time.sleep(5)
    raise KdcacheError(f"{store.url}: no quantizer after {WAIT_SECONDS} s; is rank 0 running?")


def convert_complete(store: Store, shards: list[str], encoders: dict[str, Codebooks]) -> int:
    """Convert this rank's complete shards that still hold float features only."""
    n = 0
    for name in shards:
        for t, cb in encoders.items():
            if store.is_complete(name, [t]):
                n += convert_shard(store, name, t, KIND, cb, keep_float=_keep_float(store, t))
    return n


def rows_encoder(store: Store, encoders: dict[str, Codebooks]):
    dtypes = {t: store.meta.teachers[t].dtype for t in encoders}
    keep = {t: _keep_float(store, t) for t in encoders}

    def transform(rows: dict) -> dict:
        for t, cb in encoders.items():
            path = f"{t}/{KIND}"
            if path in rows:
                rows[f"{path}_codes"] = encode_rows(cb, rows[path], dtypes[t])
                if not keep[t]:
                    del rows[path]
        return rows

    return transform
