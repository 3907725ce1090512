"""Quantize a store's float features into codes: train once, then convert shard by shard.

Used by ``kdcache quantize`` on a finished fp16 store and by ``kdcache extract --quantize``
for the shards it wrote in float before the quantizer existed. Crash-safe per shard: the codes
array is written, then one atomic attribute update adds it to the digest (and drops the float
array from it unless ``keep_float``), then the float array is deleted. A rerun skips shards
whose digest has codes and cleans up arrays the digest does not list.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
from tqdm import tqdm

from kdcache.store import Codebooks, Store, feature_path, to_float32
from kdcache.store.lease import new_owner
from kdcache.store.meta import quantizer_path

from .fidelity import measure
from .methods import QuantizeError, QuantizerSpec, encode, fit
from .sample import SampleSpec, draw, training_prefix

log = logging.getLogger("kdcache.quantize")


def train_quantizer(store: Store, teacher: str, kind: str, qspec: QuantizerSpec, sspec: SampleSpec,
                    shards: list[str] | None = None, *, keep_float: bool = False) -> Codebooks:
    """Sample, fit, measure on held-out tokens, write the codebooks and the teacher's metadata."""
    if shards is None:
        shards, _ = training_prefix(store, teacher, kind, sspec)
    if not shards:
        raise QuantizeError(f"{store.url}: no complete shard with float {kind} features of teacher {teacher}")
    train, held, desc = draw(store, teacher, kind, shards, sspec)
    log.info("training %s on %d %s tokens of %s from %d shard(s)", qspec.describe(), len(train), kind, teacher, len(shards))
    cb = fit(qspec, train, seed=sspec.seed)
    fid = measure(cb, held) if len(held) else {}
    dim = cb.dim
    cb = dataclasses.replace(cb, attrs={**cb.attrs, "trained_on": desc, **fid, "bytes_per_token": cb.m,
                                        "compression_vs_fp16": dim * 2 / cb.m, "compression_vs_fp32": dim * 4 / cb.m})
    store.write_codebooks(teacher, kind, cb)
    set_teacher_quantizer(store, teacher, kind, cb, keep_float=keep_float)
    return cb


def set_teacher_quantizer(store: Store, teacher: str, kind: str, cb: Codebooks, *, keep_float: bool) -> None:
    t = store.meta.teachers[teacher]
    summary = {k: cb.attrs.get(k) for k in ("spec", "relmse", "mean_cos", "p5_cos", "bytes_per_token",
                                             "compression_vs_fp16", "compression_vs_fp32", "train_seconds")}
    q = dict(t.quantizer or {})
    q[kind] = {"method": cb.method, "m": cb.m, "kind": cb.kind, "keep_float": keep_float, **summary}
    teachers = dict(store.meta.teachers)
    teachers[teacher] = dataclasses.replace(t, quantizer=q)
    store.write_meta(store.meta.replace(teachers=teachers))


def convert_shard(store: Store, shard: str, teacher: str, kind: str, cb: Codebooks, *, keep_float: bool,
                  leases=None) -> bool:
    """Add the teacher's ``kind`` codes to a complete shard (crash-safe: ``Store.derive_array``),
    under the shard's lease when ``leases`` is given. Returns False if it already had them, or
    another job holds the shard (it converts it)."""
    if leases is not None:
        holder = leases.acquire(shard)
        if holder is not None:
            log.info("shard %s is being written by %s; moving on", shard, holder.describe())
            return False
        try:
            return convert_shard(store, shard, teacher, kind, cb, keep_float=keep_float)
        finally:
            leases.release(shard)
    src = feature_path(teacher, kind)
    t = store.meta.teachers[teacher]
    row_shape = (store.meta.views, t.tokens, cb.m) if kind == "patch" else (store.meta.views, cb.m)
    return store.derive_array(shard, src, feature_path(teacher, kind, codes=True), row_shape=row_shape, dtype="uint8",
                              codec=t.codec, attrs={"quantizer": quantizer_path(teacher, kind)}, keep_source=keep_float,
                              transform=lambda rows: encode_rows(cb, rows, t.dtype))


def encode_rows(cb: Codebooks, rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored float rows (..., D) in storage dtype -> (..., M) uint8 codes."""
    x = to_float32(rows, dtype)
    return encode(cb, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], cb.m)


def quantize_store(url: str, teacher: str, qspec: QuantizerSpec, *, kind: str = "patch", keep_float: bool = False,
                   sample: SampleSpec = SampleSpec(), progress: bool = True) -> dict:
    """``kdcache quantize``: train (or reuse) the quantizer, then convert every complete shard."""
    store = Store.open(url, writable=True)
    if teacher not in store.meta.teachers:
        raise QuantizeError(f"{url}: no teacher {teacher!r} (teachers: {', '.join(store.meta.teachers)})")
    cb = store.read_codebooks(teacher, kind)
    want = qspec.key(store.meta.teachers[teacher].dim)
    if cb is not None and cb.attrs.get("spec") != want:
        raise QuantizeError(f"{url}: teacher {teacher} {kind} is already quantized with {cb.attrs.get('spec')}; "
                            f"this asks for {want}")
    if cb is None:
        cb = train_quantizer(store, teacher, kind, qspec, sample, keep_float=keep_float)
    shards = store.complete_shards([teacher])
    converted = 0
    leases = store.leases(new_owner(), pid=os.getpid())  # one writer per shard, as in extraction
    for name in tqdm(shards, desc=f"quantize {teacher}/{kind}", unit="shard", disable=not progress):
        converted += convert_shard(store, name, teacher, kind, cb, keep_float=keep_float, leases=leases)
    from .stats import compute_stats, write_stats
    write_stats(store, teacher, kind, compute_stats(store, teacher, kind))  # the targets are now the decoded codes
    return {"teacher": teacher, "kind": kind, "shards_converted": converted, "shards_skipped": len(shards) - converted,
            **{k: cb.attrs.get(k) for k in ("spec", "bytes_per_token", "compression_vs_fp16", "relmse", "mean_cos",
                                             "p5_cos", "train_seconds")}}
