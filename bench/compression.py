"""``kdcache bench codec``: size and speed of none / lz4 / zstd on the same fp16 features.

Writes and reads the features the way a store does (sharded array, ~1 MiB inner chunks, Blosc
with byte shuffle), every codec's write, zarr read and loader read (the training loader's block
read, checks included: ``store.reads``) interleaved and repeated (``bench.harness``), and prints
stored size relative to uncompressed with medians and spreads of the speeds, and what ``--codec
auto`` picks for these features.
"""
from __future__ import annotations

import json
import tempfile

import numpy as np
import zarr

from kdcache.store.layout import CHUNK_BYTES, compressors, resolved_codec
from kdcache.store.objects import Objects
from kdcache.store.checks import all_finite, crc32
from kdcache.store.reads import BlockBuffers, block_in_one_request

from .harness import environment, header, measure
from .options import CodecBench


def bench_codec(x: np.ndarray, *, what: str, codecs=("none", "lz4", "zstd"), repeat: int = 5, as_json: bool = False) -> str:
    rows = max(1, CHUNK_BYTES // (x[0].nbytes or 1))
    x = np.ascontiguousarray(x[: len(x) // rows * rows].astype(np.float16))  # whole inner chunks
    mib = x.nbytes / 2**20
    with tempfile.TemporaryDirectory() as d:
        stored = {}

        def write(codec):
            def run():
                g = zarr.open_group(f"{d}/{codec}", mode="w")
                a = g.create_array("x", shape=x.shape, dtype="float16", shards=x.shape, chunks=(rows, *x.shape[1:]),
                                   compressors=compressors(codec))
                a[...] = x
                stored[codec] = a.nbytes_stored() / x.nbytes
            return run

        def read(codec):
            return lambda: np.asarray(zarr.open_array(f"{d}/{codec}/x", mode="r")[...])

        def loader_read(codec):  # the block read every training step's targets go through, checked
            buffers, opened = BlockBuffers(), {}

            def run():
                if "x" not in opened:  # once, after the first write: a loader keeps the arrays it reads (OpenedArrays)
                    opened["x"] = zarr.open_group(f"{d}/{codec}", mode="r")["x"]  # (its path relative to the group)
                rows = block_in_one_request(Objects(f"{d}/{codec}"), opened["x"], 0, len(x), 0, buffers)
                assert crc32(rows) >= 0 and all_finite(rows)
            return run

        sides = {}
        for codec in codecs:  # each round: write then read every codec, interleaved with the others
            sides[f"{codec} write"], sides[f"{codec} read"] = write(codec), read(codec)
            sides[f"{codec} loader read"] = loader_read(codec)
        m = measure(sides, repeat=repeat, items={k: mib for k in sides})
    env, auto = environment(), resolved_codec("auto", x)
    if as_json:
        return json.dumps({"environment": env, "features": what, "shape": list(x.shape), "mib": mib,
                           "stored_over_raw": stored, "auto": auto, "measurement": m.to_dict()}, indent=2)
    out = [header(f"bench codec: {what}, {x.shape} float16, {mib:.1f} MiB", env, repeat=repeat, warmup=m.warmup), "",
           "| codec | stored / raw | write MiB/s | zarr read MiB/s | loader read MiB/s |", "|---|---|---|---|---|"]
    for codec in codecs:
        out.append(f"| {codec} | {stored[codec]:.3f} | {m.rate(codec + ' write').fmt(0)} | {m.rate(codec + ' read').fmt(0)} "
                   f"| {m.rate(codec + ' loader read').fmt(0)} |")
    out += ["", f"`--codec auto` picks **{auto}** for these features (lz4 where it stores the first block in at most "
                f"95% of its bytes)."]
    return "\n".join(out)


def run_bench_codec(o: CodecBench) -> str:
    """``kdcache bench codec``: the features from a .npy matrix or MiniLM tokens of real texts."""
    kw = dict(codecs=o.codecs, repeat=o.repeat, as_json=o.as_json)
    if o.npy:
        return bench_codec(np.load(o.npy), what=o.npy, **kw)
    from .text_features import minilm_token_features
    return bench_codec(minilm_token_features(o.minilm), what=f"MiniLM-L6 token features of {o.minilm} real texts", **kw)
