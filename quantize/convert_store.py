"""Quantize a store's float features into codes: train once, then convert shard by shard.

Used by ``kdcache quantize`` on a finished fp16 store and by ``kdcache extract --quantize``
for the shards it wrote in float before the quantizer existed. Encoding runs in torch on the
given device (quantize/encoder.py). Under torchrun (or --rank/--world-size) rank 0 trains,
every rank converts its share. Crash-safe per shard: the codes array is written, then one
atomic attribute update adds it to the digest (and drops the float array from it unless
``keep_float``), then the float array is deleted. A rerun skips shards whose digest has codes
and cleans up arrays the digest does not list.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from kdcache.data.partition import rank_and_world, rank_share
from kdcache.models.device import resolve_device
from kdcache.store import Codebooks, Store, feature_path, to_float32
from kdcache.store.inspect import write_summary
from kdcache.store.lease import Heartbeat, new_owner
from kdcache.store.meta import dense_path, quantizer_path
from kdcache.targets.sample import SampleSpec, draw, training_prefix
from kdcache.targets.stats import compute_stats, write_stats

from .encoder import TorchEncoder
from .methods import fit, require_faiss
from .quantizer_spec import QuantizeError, QuantizerSpec
from .reconstruction import measure

log = logging.getLogger("kdcache.quantize")
WAIT_SECONDS = 24 * 3600


def train_quantizer(store: Store, teacher: str, kind: str, qspec: QuantizerSpec, sspec: SampleSpec,
                    shards: list[str] | None = None, *, keep_float: bool = False) -> Codebooks:
    """Sample, fit, measure on held-out tokens, write the codebooks and the teacher's metadata."""
    if shards is None:
        shards, _ = training_prefix(store, teacher, kind, sspec)
    if not shards:
        raise QuantizeError(f"{store.url}: no complete shard with float {kind} features of teacher {teacher}")
    key = qspec.key(store.meta.teachers[teacher].dim)
    log.info("quantizer %s of %s %s: sampling %d tokens from %d shard(s)", key, teacher, kind, sspec.total, len(shards))
    train, held, desc = draw(store, teacher, kind, shards, sspec)
    log.info("quantizer %s: training on %d tokens with faiss%s", key, len(train),
             f" ({qspec.opq_iter} rotation alternations; --opq-iter sets them)" if qspec.method == "opq" else "")
    cb = fit(qspec, train, seed=sspec.seed)
    fid = measure(cb, held) if len(held) else {}
    if fid:
        log.info("quantizer %s: held-out mean cos %.4f, relMSE %.4f on %d tokens; converting shards", key, fid["mean_cos"],
                 fid["relmse"], len(held))
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


def _polls(seconds: float):
    """Yield until ``seconds`` have passed, sleeping 0.2 s, 0.4 s, ... (at most 5 s) between yields."""
    deadline, pause = time.time() + seconds, 0.2
    while time.time() < deadline:
        yield
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


def wait_for_codebooks(store: Store, teacher: str, kind: str, *, seconds: float = WAIT_SECONDS) -> Codebooks:
    """Ranks other than 0: wait until rank 0 has written the quantizer, then take the new metadata."""
    log.info("waiting for rank 0 to train the %s quantizer of %s", kind, teacher)
    for _ in _polls(seconds):
        cb = store.read_codebooks(teacher, kind)
        if cb is not None:
            store.meta = Store.open(store.url, writable=True).meta
            return cb
    raise QuantizeError(f"{store.url}: no {kind} quantizer for {teacher} after {seconds:.0f} s; is rank 0 running?")


def convert_shard(store: Store, shard: str, teacher: str, kind: str, encoder: TorchEncoder, *, keep_float: bool,
                  leases=None, active: set | None = None) -> bool:
    """Add the teacher's ``kind`` codes to a complete shard (crash-safe: ``Store.derive_array``),
    under the shard's lease when ``leases`` is given (``active`` holds it while it is being
    written, for a ``Heartbeat``). Returns False if it already had them, or another job holds
    the shard (it converts it)."""
    if leases is not None:
        holder = leases.acquire(shard)
        if holder is not None:
            log.info("shard %s is being written by %s; moving on", shard, holder.describe())
            return False
        if active is not None:
            active.add(shard)
        try:
            return convert_shard(store, shard, teacher, kind, encoder, keep_float=keep_float)
        finally:
            if active is not None:
                active.discard(shard)
            leases.release(shard)
    src = feature_path(teacher, kind)
    t = store.meta.teachers[teacher]
    m = encoder.cb.m
    row_shape = (store.meta.views, t.tokens, m) if kind == "patch" else (store.meta.views, m)
    attrs = {"quantizer": quantizer_path(teacher, kind)}
    changed = False
    if kind == "patch" and t.dense:  # the dense maps are patch tokens too: the same codebooks
        grid = t.dense["grid"]
        changed = store.derive_array(shard, dense_path(teacher), dense_path(teacher, codes=True), row_shape=(grid[0] * grid[1], m),
                                     dtype="uint8", codec=t.codec, attrs=attrs, keep_source=keep_float,
                                     transform=lambda rows: encode_rows(encoder, rows, t.dtype))
    return store.derive_array(shard, src, feature_path(teacher, kind, codes=True), row_shape=row_shape, dtype="uint8",
                              codec=t.codec, attrs=attrs, keep_source=keep_float,
                              transform=lambda rows: encode_rows(encoder, rows, t.dtype)) or changed


def encode_rows(encoder: TorchEncoder, rows, dtype: str) -> np.ndarray:
    """Stored float rows (..., D) in storage dtype (numpy) -> (..., M) uint8 codes (numpy)."""
    x = to_float32(rows, dtype)
    return encoder(x.reshape(-1, x.shape[-1])).cpu().numpy().reshape(*x.shape[:-1], encoder.cb.m)


def quantize_store(url: str, teacher: str, qspec: QuantizerSpec, *, kind: str = "patch", keep_float: bool = False,
                   sample: SampleSpec = SampleSpec(), progress: bool = True, rank: int = 0, world_size: int = 1,
                   device: str | torch.device = "cpu") -> dict:
    """``kdcache quantize``: rank 0 trains (or finds) the quantizer, other ranks wait for it; every
    rank encodes its share of the complete shards on ``device``, one writer per shard (leases),
    then takes any shard nobody holds (a dead rank's too); with several ranks, rank 0 waits for
    the last shard (converting any whose holder died) before it writes the statistics.
    Rerunning resumes: shards with codes are skipped."""
    store = Store.open(url, writable=True)
    if teacher not in store.meta.teachers:
        raise QuantizeError(f"{url}: no teacher {teacher!r} (teachers: {', '.join(store.meta.teachers)})")
    cb = store.read_codebooks(teacher, kind)
    want = qspec.key(store.meta.teachers[teacher].dim)
    if cb is not None and cb.attrs.get("spec") != want:
        raise QuantizeError(f"{url}: teacher {teacher} {kind} is already quantized with {cb.attrs.get('spec')}; "
                            f"this asks for {want}")
    if cb is None:
        cb = (train_quantizer(store, teacher, kind, qspec, sample, keep_float=keep_float) if rank == 0
              else wait_for_codebooks(store, teacher, kind))
    encoder = TorchEncoder(cb, device)
    shards = store.complete_shards([teacher])
    mine = rank_share(shards, rank, world_size)
    taken = set(mine)
    rest = [s for s in reversed(shards) if s not in taken]  # from the far end: least contention
    leases = store.leases(new_owner(), pid=os.getpid())  # one writer per shard, as in extraction
    active: set[str] = set()
    heartbeat = Heartbeat(leases, active, every=leases.seconds / 4)
    converted = 0
    try:
        for name in tqdm(mine + rest, desc=f"quantize {teacher}/{kind} rank {rank}", unit="shard", disable=not progress):
            converted += convert_shard(store, name, teacher, kind, encoder, keep_float=keep_float, leases=leases,
                                       active=active)
        # the statistics need every rank's codes; one job alone leaves a held shard to its holder
        if rank == 0 and world_size > 1:
            converted += _finish_others(store, shards, teacher, kind, encoder, keep_float, leases, active)
    finally:
        heartbeat.stop()
    if rank == 0:
        write_summary(store)  # the shard index, with the shards' new digests
        log.info("writing the normalisation statistics of %s %s (the targets are now the decoded codes)", teacher, kind)
        write_stats(store, teacher, kind, compute_stats(store, teacher, kind))
    return {"teacher": teacher, "kind": kind, "rank": rank, "world_size": world_size, "device": str(encoder.device),
            "shards_converted": converted, "shards_skipped": len(shards) - converted,
            **{k: cb.attrs.get(k) for k in ("spec", "bytes_per_token", "compression_vs_fp16", "relmse", "mean_cos",
                                             "p5_cos", "train_seconds")}}


def run_quantize(url: str, teacher: str, qspec: QuantizerSpec, *, kind: str = "patch", keep_float: bool = False,
                 sample: SampleSpec = SampleSpec(), progress: bool = True, rank: int | None = None,
                 world_size: int | None = None, device: str = "auto") -> dict:
    """``kdcache quantize``: ``quantize_store`` with rank and world from --rank/--world-size or
    torchrun's environment (``data.partition``), and ``--device`` resolved (under torchrun, cuda
    is each rank's GPU)."""
    require_faiss()  # before any shard is read
    rank, world = rank_and_world(rank, world_size)
    return quantize_store(url, teacher, qspec, kind=kind, keep_float=keep_float, sample=sample, progress=progress,
                          rank=rank, world_size=world, device=resolve_device(device))


def _finish_others(store, shards, teacher, kind, encoder, keep_float, leases, active, *, seconds: float = WAIT_SECONDS) -> int:
    """Rank 0: wait until every shard has codes, converting any whose holder is gone. Each poll
    reads only the shards still pending."""
    dst, converted, pending = feature_path(teacher, kind, codes=True), 0, list(shards)
    for _ in _polls(seconds):
        pending = [s for s in pending if dst not in (store.shard_attrs(s) or {}).get("digest", {})]
        if not pending:
            return converted
        for name in pending:
            converted += convert_shard(store, name, teacher, kind, encoder, keep_float=keep_float, leases=leases,
                                       active=active)
    raise QuantizeError(f"{store.url}: shards {', '.join(pending[:3])} still lack {dst} after {seconds:.0f} s")
