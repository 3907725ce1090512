"""``kdcache bench codec``: size and speed of none / lz4 / zstd on the same fp16 features.

Writes and reads the features the way a store does (sharded array, ~1 MiB inner chunks, Blosc
with byte shuffle), best of three, and prints ratios to uncompressed.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
import zarr

from kdcache.store.layout import CHUNK_BYTES, compressors


def bench_codec(x: np.ndarray, *, what: str, codecs=("none", "lz4", "zstd"), repeats: int = 3) -> str:
    rows = max(1, CHUNK_BYTES // (x[0].nbytes or 1))
    x = np.ascontiguousarray(x[: len(x) // rows * rows].astype(np.float16))  # whole inner chunks
    mib = x.nbytes / 2**20
    out = [f"# bench codec: {what}, {x.shape} float16, {mib:.1f} MiB", "",
           "| codec | stored / raw | write MiB/s | read MiB/s |", "|---|---|---|---|"]
    for codec in codecs:
        writes, reads = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as d:
                g = zarr.open_group(d, mode="w")
                t0 = time.perf_counter()
                a = g.create_array("x", shape=x.shape, dtype="float16", shards=x.shape, chunks=(rows, *x.shape[1:]),
                                   compressors=compressors(codec))
                a[...] = x
                writes.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                np.asarray(zarr.open_array(f"{d}/x", mode="r")[...])
                reads.append(time.perf_counter() - t0)
                ratio = a.nbytes_stored() / x.nbytes
        out.append(f"| {codec} | {ratio:.3f} | {mib / min(writes):.0f} | {mib / min(reads):.0f} |")
    return "\n".join(out)


def bench_codec_source(*, npy: str | None = None, minilm: int | None = None) -> str:
    """``kdcache bench codec``: the features from a .npy matrix or MiniLM tokens of real texts."""
    if npy:
        return bench_codec(np.load(npy), what=npy)
    from .text_features import minilm_token_features
    return bench_codec(minilm_token_features(minilm), what=f"MiniLM-L6 token features of {minilm} real texts")
