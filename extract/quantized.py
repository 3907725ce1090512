"""The pieces of ``kdcache extract --quantize``; the sequence itself is written out in ``run.extract``.

The quantizer trains on the corpus-order prefix of shards written in float (the same prefix
rule ``kdcache quantize`` applies to a finished store, so both paths train on the same sample
and give the same codes); those shards are converted; every later batch is encoded on the
extraction device right after the teacher's forward (quantize/encoder.py), from the
storage-dtype values (exactly what conversion reads back), so only uint8 codes travel to the
host and the writer thread only compresses. Other ranks wait for the quantizer to appear.
Resumable at every step: the quantizer is written once, atomically, and shards keep their own
completion.
"""
from __future__ import annotations

import logging
import os

from kdcache.data.corpus import Corpus
from kdcache.errors import KdcacheError
from kdcache.quantize.convert_store import convert_shard, set_teacher_quantizer, train_quantizer, wait_for_codebooks
from kdcache.quantize.encoder import TorchEncoder
from kdcache.quantize.quantizer_spec import QuantizerSpec
from kdcache.store import Codebooks, Store
from kdcache.store.lease import new_owner
from kdcache.targets.sample import SampleSpec, training_prefix

log = logging.getLogger("kdcache.extract")
KIND = "patch"  # CLS stays float during extraction (small); `kdcache quantize --tokens cls` converts it


def sample_spec(opts) -> SampleSpec:
    return SampleSpec(train_tokens=opts.quantize_sample, seed=opts.seed, pool=opts.quantize_pool)


def stored_quantizers(store: Store) -> dict[str, Codebooks]:
    """Codebooks of every teacher whose patch features the store keeps as codes."""
    return {t: cb for t, m in store.meta.teachers.items() if (m.quantizer or {}).get(KIND)
            for cb in [store.read_codebooks(t, KIND)] if cb is not None}


def quantizers_to_train(store: Store, teachers, spec: QuantizerSpec, found: dict[str, Codebooks], *,
                        keep_float: bool = False) -> list[str]:
    """The command's teachers without codebooks; a teacher quantized with another spec is refused."""
    need = []
    for t in teachers:
        cb = found.get(t) or store.read_codebooks(t, KIND)
        if cb is None:
            need.append(t)
        elif cb.attrs.get("spec") != spec.key(store.meta.teachers[t].dim):
            raise KdcacheError(f"--quantize {spec.method}: teacher {t} in {store.url} is already quantized with {cb.attrs.get('spec')}")
        elif t not in found:
            # a run killed between writing the codebooks and recording them in the metadata:
            # record them now, so this run encodes with them instead of writing floats
            set_teacher_quantizer(store, t, KIND, cb, keep_float=keep_float)
            found[t] = cb
    return need


def complete_prefix(store: Store, corpus: Corpus) -> list[str]:
    """The corpus-order run of shards, from the first, that are complete with every teacher."""
    teachers, out = list(store.meta.teachers), []
    for shard in corpus.shards:
        if not store.is_complete(shard.name, teachers):
            break
        out.append(shard.name)
    return out


def prefix_holds_sample(store: Store, teachers: list[str], sample: SampleSpec, prefix: list[str]) -> bool:
    return all(training_prefix(store, t, KIND, sample, shards=prefix)[1] for t in teachers)


def train_quantizers(store: Store, teachers: list[str], spec: QuantizerSpec, sample: SampleSpec, prefix: list[str], *,
                     keep_float: bool) -> dict[str, Codebooks]:
    out = {}
    for t in teachers:
        shards, _ = training_prefix(store, t, KIND, sample, shards=prefix)
        out[t] = cb = train_quantizer(store, t, KIND, spec, sample, shards=shards, keep_float=keep_float)
        log.info("teacher %s: %s, held-out mean cos %.4f, relMSE %.4f", t, cb.attrs["spec"],
                 cb.attrs.get("mean_cos", float("nan")), cb.attrs.get("relmse", float("nan")))
    return out


def wait_for_quantizers(store: Store, teachers: list[str]) -> dict[str, Codebooks]:
    """Other ranks: wait until rank 0 has written every quantizer (then the store's metadata is fresh)."""
    return {t: wait_for_codebooks(store, t, KIND) for t in teachers}


def device_encoders(quantizers: dict[str, Codebooks], device) -> dict[str, TorchEncoder]:
    return {t: TorchEncoder(cb, device) for t, cb in quantizers.items()}


def convert_complete(store: Store, shards: list[str], encoders: dict[str, TorchEncoder]) -> int:
    """Convert this rank's complete shards that still hold float features only (under leases)."""
    n = 0
    leases = store.leases(new_owner(), pid=os.getpid())
    for name in shards:
        for t, encoder in encoders.items():
            if store.is_complete(name, [t]):
                n += convert_shard(store, name, t, KIND, encoder, keep_float=keep_float(store, t), leases=leases)
    return n


def keep_float(store: Store, teacher: str) -> bool:
    return bool(store.meta.teachers[teacher].quantizer[KIND].get("keep_float"))
