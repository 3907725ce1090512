"""``kdcache bench load``: the training loader's samples/s and MB/s, verification on and off,
from a local store and the same store on an S3-compatible server (a loopback moto server the
bench starts, or a URL you give), all sides interleaved (``bench.harness``).

Each side streams one epoch of the real loader (corpus shard and store shard together, view
replay, targets as stored bytes) through a DataLoader; MB/s counts the target bytes delivered.
Verification is the per-block CRC-32 and finiteness check every training run does; the target
is that it costs at most 5% of loader throughput.
"""
from __future__ import annotations

import json
import os
import tempfile

from torch.utils.data import DataLoader

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.store.ops import copy_stores
from kdcache.targets.decoding import TargetDecoder, stored_codebooks
from kdcache.train.loader import CachedStream, LoaderSpec, collate

from .harness import environment, header, limit_note, measure
from .options import LoadBench


def _epoch(store_url: str, data: str, *, verify: bool, workers: int, batch_size: int):
    store = Store.open(store_url)
    corpus = resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus))
    teacher = next(iter(store.meta.teachers))
    paths = tuple(TargetDecoder(teacher, store.meta.teachers[teacher], codebooks=stored_codebooks(store, teacher),
                                normalize="none", stats=None).paths.values())
    spec = LoaderSpec(store_url=store_url, shards=tuple(store.complete_shards()), target_paths=paths, input_size=(64, 64),
                      interpolation="bilinear", shuffle_buffer=64, workers=workers, verify=verify,
                      decode=corpus.options.decode)

    def run():
        n = nbytes = 0
        for batch in DataLoader(CachedStream(corpus, spec), batch_size=batch_size, num_workers=workers, collate_fn=collate):
            n += len(batch["key"])
            nbytes += sum(batch[p].numel() * batch[p].element_size() for p in paths)
        run.bytes_per_sample = nbytes / max(1, n)
        return n
    return run


def bench_load(o: LoadBench = LoadBench()) -> str:
    store, data, workers, batch_size, s3, repeat, as_json = o.store, o.data, o.workers, o.batch_size, o.s3, o.repeat, o.as_json
    with tempfile.TemporaryDirectory() as tmp:
        if store is None:
            data = f"{tmp}/corpus"
            build_demo_corpus(data, digits=0, photos=o.images, shard_size=32)
            store = f"{tmp}/store.zarr"
            extract(data, store, [o.teacher], ExtractOptions(progress=False, batch_size=16))
        locations = {"local": store}
        server = None
        note = ""
        if s3 == "auto":
            server, remote = _loopback_s3(store)
            if remote:
                locations["s3 (loopback moto)"] = remote
            else:
                note = "S3 rows skipped: moto and s3fs are not installed (pip install 'kdcache[bench]')"
        elif s3 != "off":
            copy_stores([store], s3, progress=False)
            locations["s3"] = s3
        try:
            sides = {}
            for where, url in locations.items():
                for verify in (True, False):
                    sides[f"{where}, verification {'on' if verify else 'off'}"] = _epoch(url, data, verify=verify, workers=workers,
                                                                                         batch_size=batch_size)
            m = measure(sides, repeat=repeat)
        finally:
            if server is not None:
                server.stop()
    per_sample = next(iter(sides.values())).bytes_per_sample
    env = environment()
    ratios = {where: m.ratio(f"{where}, verification on", f"{where}, verification off") for where in locations}
    if as_json:
        return json.dumps({"environment": env, "workers": workers, "batch_size": batch_size, "bytes_per_sample": per_sample,
                           "measurement": m.to_dict(), "verified_over_unverified": {w: r.to_dict() for w, r in ratios.items()}},
                          indent=2)
    lines = [header(f"bench load: one loader epoch per side, {workers} worker(s), batch {batch_size}, "
                    f"{per_sample / 1024:.1f} KiB of targets per sample", env, repeat=repeat, warmup=m.warmup),
             "", "| side | samples/s | target MB/s |", "|---|---|---|"]
    for name in sides:
        lines.append(f"| {name} | {m.rate(name).fmt(1)} | {m.rate(name).fmt(2, per_sample / 1e6)} |")
    lines.append("")
    for where, r in ratios.items():
        lines.append(f"{where}: verified / unverified throughput = {r.fmt(3)} (target >= 0.95)")
        n = limit_note(r, f"{where} verified/unverified")
        if n:
            lines.append(n)
    if note:
        lines.append(note)
    return "\n".join(lines)


def _loopback_s3(store: str):
    """Start a moto S3 server on 127.0.0.1 and copy the store there; (server, url) or (None, None)."""
    try:
        import fsspec.config
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None, None
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://{host}:{port}"
    s3fs.S3FileSystem().mkdir("kdcache-bench")
    url = "s3://kdcache-bench/store.zarr"
    copy_stores([store], url, progress=False)
    return server, url
