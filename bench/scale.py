"""``kdcache bench scale``: what each command costs as a store grows to thousands of shards.

For each shard count N (default 100, 1,000, 10,000) the bench builds a corpus of N tiny
webdataset shards (one 16x16 digit each) and extracts it with a tiny teacher into a store of N
shards (kept in ``OUT`` and reused), then copies both to an S3-compatible server on loopback
(moto, counting the requests it serves). Each command then runs as a fresh ``kdcache``
process, as a user runs it, timed end to end, its requests counted at the server, its peak
memory read from the kernel (``wait4``):

- ``info``, ``store ls``: metadata only (with the shard index: a fixed few requests);
- ``verify --metadata-only``: every shard's metadata and array shapes (one pass over the shards
  by design);
- ``train`` to the first step (``--stop-at-step 1``, one checkpoint): start-up;
- ``eval knn --store``: reads every shard's features (grows with N by design);
- and each metadata command once more without the shard index (the store as written before
  it existed), to show what the index saves.

Targets (issue 19): start-up requests constant in N with the index (at most 1 per 1,000 shards
beyond a fixed few: S3 lists 1,000 names per request), start-up seconds at 10,000 shards at most
2x those at 100. Every figure is the median of ``repeat`` runs with min-max; commands are
interleaved across repetitions.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.train.rundir import RunDir

from .harness import environment
from .options import PlanBench, ScaleBench

TEACHER = "vit=vit_tiny_patch16_224,pretrained=false,img_size=32,depth=1"
STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"
COMMANDS = ("info", "store ls", "verify --metadata-only", "train to step 1", "eval knn --store")
START_UP = ("info", "store ls", "train to step 1", "train resume")  # what the start-up targets are about


def shard_split_share(shards: int, size: int, *, world: int, workers: int, batch_size: int) -> float:
    """What the whole-shard split kdcache used before delivered of an epoch (for comparison): ranks
    took every world-th shard, workers every workers-th of those, each worker dropped its last
    partial batch, and an epoch ran to the smallest rank's batch count; 0 when a rank had none."""
    per_rank = []
    for r in range(world):
        mine = list(range(r, shards, world))
        per_rank.append(sum(len(mine[w::max(1, workers)]) * size // batch_size for w in range(max(1, workers))))
    return min(per_rank) * batch_size * world / (shards * size)


def mixing(shards: int, size: int, *, window: int, block: int = 443, pairs: int = 20000, seed: int = 0) -> dict:
    """How close an epoch's order is to a global shuffle: the share of consecutive samples (what one
    batch holds) that come from the same shard, for the order the trainer splits (blocks in a seeded
    order, samples permuted within windows of ``window``), the whole-shard stream kdcache used before
    (a worker's shards one after another through a shuffle buffer of ``window``, simulated) and a
    true permutation (1 / shards for shards of one size)."""
    import random

    from kdcache.data.partition import EpochOrder, ShardRows
    order = EpochOrder([ShardRows(f"s{i}", size, block) for i in range(shards)], seed=seed, epoch=0, window=window)
    start = order.total // 3
    ids = [order[p].shard for p in range(start, min(order.total, start + pairs + 1))]
    now = sum(a == b for a, b in zip(ids, ids[1:])) / (len(ids) - 1)
    rng, buffer, out = random.Random(seed), [], []
    for shard in range(max(4, -(-4 * window // size) + 2)):  # the old ShardStream's reservoir: fill, then each
        # arrival replaces a random slot (over enough shards for several buffers' worth to leave)
        for _ in range(size):
            if len(buffer) < window:
                buffer.append(shard)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], leaving = shard, buffer[j]
            out.append(leaving)
    before = sum(a == b for a, b in zip(out, out[1:])) / (len(out) - 1)
    return {"window": window, "same_shard": now, "same_shard_before": before, "same_shard_permutation": 1 / shards}


def plan_table(o: PlanBench) -> dict:
    """Per store layout and rank count: the trainer's own split (``data.partition``), counted; and
    how close each layout's order is to a global shuffle, per window."""
    from kdcache.data.partition import ShardRows, delivered_share
    rows, mixes = [], []
    for shards, size in o.layouts:
        store = [ShardRows(f"s{i}", size, 443) for i in range(shards)]  # (ViT-S/16 fp16 blocks: 443 rows)
        for world in o.ranks:
            d = delivered_share(store, world=world, workers=o.workers, batch_size=o.batch_size, last_batch=o.last_batch)
            rows.append({"shards": shards, "samples_per_shard": size, "ranks": world, **d,
                         "shard_split_share": shard_split_share(shards, size, world=world, workers=o.workers,
                                                                batch_size=o.batch_size)})
        for window in o.windows:
            mixes.append({"shards": shards, "samples_per_shard": size, **mixing(shards, size, window=window)})
    return {"plan": asdict(o), "rows": rows, "mixing": mixes}


def format_plan(d: dict) -> str:
    p = d["plan"]
    lines = [f"# bench scale --plan: the share of an epoch delivered, {p['workers']} workers per rank, batch "
             f"{p['batch_size']} per rank, --last-batch {p['last_batch']} (the trainer's split, counted)", "",
             "| store | ranks | steps | delivered (unique) | share | repeats | whole-shard split (before) |",
             "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        before = "nothing (refused)" if r["shard_split_share"] == 0 else f"{r['shard_split_share']:.3f}"
        lines.append(f"| {r['shards']:,} x {r['samples_per_shard']:,} | {r['ranks']} | {r['steps']:,} | "
                     f"{r['delivered_unique']:,} of {r['samples']:,} | {r['share']:.4f} | {r['padded']} | {before} |")
    lines += ["", "How close to a global shuffle: the share of consecutive samples (one batch) from the same shard",
              "", "| store | --shuffle-buffer | this order | whole-shard stream (before) | a true permutation |",
              "|---|---|---|---|---|"]
    for m in d["mixing"]:
        lines.append(f"| {m['shards']:,} x {m['samples_per_shard']:,} | {m['window']:,} | {m['same_shard']:.3f} | "
                     f"{m['same_shard_before']:.3f} | {m['same_shard_permutation']:.4f} |")
    return "\n".join(lines)


def build_corpus(path: str, shards: int) -> str:
    """``shards`` webdataset tars of one 16x16 digit each (keys and labels distinct)."""
    from sklearn.datasets import load_digits

    from kdcache.data.demo_corpus import encode
    if os.path.exists(os.path.join(path, ".complete")):
        return path
    os.makedirs(path, exist_ok=True)
    digits = load_digits()
    for i in range(shards):
        img = np.kron((digits.images[i % len(digits.images)] * 255 / 16).astype(np.uint8), np.ones((2, 2), np.uint8))
        with tarfile.open(os.path.join(path, f"s{i:05d}.tar"), "w") as tar:
            for name, data in ((f"img{i:05d}.png", encode(img, "png")), (f"img{i:05d}.cls", str(i % 10).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
    open(os.path.join(path, ".complete"), "w").close()
    return path


def build_store(corpus: str, path: str, *, progress: bool) -> str:
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    extract(corpus, path, [TEACHER], ExtractOptions(views=1, workers=0, batch_size=8, progress=progress))
    return path


def _run(args: list[str], env: dict) -> tuple[float, int, str]:
    """Seconds, peak RSS (bytes) and stderr tail of one ``kdcache`` process."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "kdcache", *args], stdout=out, stderr=subprocess.PIPE, env=env)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise KdcacheError(f"bench scale: kdcache {' '.join(args[:2])} exited {p.returncode}: {tail[0]}")
    return seconds, usage.ru_maxrss * 1024, err.decode(errors="replace")


def command_line(command: str, store: str, corpus: str, run: str) -> list[str]:
    return {"info": ["info", store, "--json"],
            "store ls": ["store", "ls", store, "--json"],
            "verify --metadata-only": ["verify", store, "--metadata-only", "--json"],
            "train to step 1": ["train", "--store", store, "--data", corpus, "--student", STUDENT, "--out", run,
                                "--epochs", "1", "--stop-at-step", "1", "--batch-size", "4", "--workers", "0",
                                "--head-hidden", "8", "--warmup-steps", "0", "--overwrite", "--no-progress"],
            "train resume": ["train", "--store", store, "--data", corpus, "--student", STUDENT, "--out", run, "--epochs", "1",
                             "--resume", "--stop-at-step", str(RESUME_AT(shards_of(store)) + 1), "--batch-size", "4",
                             "--workers", "0", "--head-hidden", "8", "--warmup-steps", "0", "--no-progress"],
            "eval knn --store": ["eval", "knn", "--store", store, "--data", corpus, "--json"]}[command]


def RESUME_AT(shards: int) -> int:  # noqa: N802 - the step a "train resume" run was stopped at: 90% of its epoch
    return max(1, (shards // 4) * 9 // 10)


def shards_of(store: str) -> int:
    """The shard count a bench store was built with (its name says: store-N.zarr)."""
    return int(store.rstrip("/").rsplit("store-", 1)[1].split(".", 1)[0])


def prepare_resume(store: str, corpus: str, run: str, extra: list[str], env: dict) -> str:
    """A run stopped at 90% of its first epoch (built once per store, outside the timing); each timed
    resume starts from a fresh copy of it."""
    kept = run + ".stopped"
    if not RunDir(kept).has_checkpoint():
        shutil.rmtree(kept, ignore_errors=True)
        args = command_line("train to step 1", store, corpus, kept)
        args[args.index("--stop-at-step") + 1] = str(RESUME_AT(shards_of(store)))
        _run(args + extra, env)
    return kept


def _hide_index(store: str, fs) -> tuple[bytes, bytes]:
    """Take the shard index out of a store (and its digest out of the root): a store from before it."""
    from kdcache.store.shard_index import INDEX_ATTR, INDEX_KEY
    index, root = fs.cat(f"{store}/{INDEX_KEY}"), fs.cat(f"{store}/zarr.json")
    meta = json.loads(root)
    meta["attributes"].pop(INDEX_ATTR, None)
    fs.rm(f"{store}/{INDEX_KEY}")
    fs.pipe(f"{store}/zarr.json", json.dumps(meta).encode())
    return index, root


def _restore_index(store: str, fs, saved: tuple[bytes, bytes]) -> None:
    from kdcache.store.shard_index import INDEX_KEY
    fs.pipe(f"{store}/{INDEX_KEY}", saved[0])
    fs.pipe(f"{store}/zarr.json", saved[1])


def bench_scale(o: ScaleBench) -> dict:
    import fsspec
    from tqdm import tqdm
    os.makedirs(o.out, exist_ok=True)
    built = {}
    for n in o.shards:
        corpus = build_corpus(os.path.join(o.out, f"corpus-{n}"), n)
        store = os.path.join(o.out, f"store-{n}.zarr")
        if not os.path.exists(os.path.join(store, "shard_index.json")):
            build_store(corpus, store, progress=o.progress)
        built[n] = (corpus, store)
    locations = {"local": {n: (c, s, []) for n, (c, s) in built.items()}}
    server = None
    if o.s3 == "auto":
        from .s3_server import LoopbackS3, use_for_s3
        server = LoopbackS3()
        use_for_s3(server.endpoint)
        fs = fsspec.filesystem("s3")
        fs.mkdir("kdcache-scale")
        remote = {}
        for n, (c, s) in built.items():
            for local, name in ((c, f"corpus-{n}"), (s, f"store-{n}.zarr")):
                files = [os.path.join(d, f) for d, _, fs_ in os.walk(local) for f in fs_ if not f.startswith(".")]
                for f in tqdm(files, desc=f"upload {name}", unit="file", disable=not o.progress):
                    fs.put_file(f, f"kdcache-scale/{name}/{os.path.relpath(f, local)}")
            remote[n] = (f"s3://kdcache-scale/corpus-{n}", f"s3://kdcache-scale/store-{n}.zarr",
                         ["--storage-option", f"endpoint_url={server.endpoint}"])
        locations["s3 (loopback moto)"] = remote
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # after the S3 set-up: its credentials too
    rows = []
    try:
        for where, stores in locations.items():
            fs = fsspec.filesystem("s3" if where != "local" else "file")
            for n, (corpus, store, extra) in stores.items():
                run = os.path.join(o.out, f"run-{n}")
                plan = [(c, True) for c in o.commands] + [(c, False) for c in o.commands if c in ("info", "store ls")]
                results = {(c, idx): [] for c, idx in plan}
                stopped = (prepare_resume(store, corpus, os.path.join(o.out, f"resume-{where[:5]}-{n}"), extra, env)
                           if "train resume" in o.commands else None)
                for _ in range(o.repeat):
                    for command, with_index in plan:
                        saved = None if with_index else _hide_index(store, fs)
                        if command == "train resume":  # from the run stopped at 90% of its epoch, afresh each time
                            shutil.rmtree(run, ignore_errors=True)
                            shutil.copytree(stopped, run)
                        try:
                            if server is not None:
                                server.reset()
                            seconds, rss, _ = _run(command_line(command, store, corpus, run) + extra, env)
                            requests = server.requests() if (server is not None and where != "local") else None
                        finally:
                            if saved is not None:
                                _restore_index(store, fs, saved)
                        results[(command, with_index)].append((seconds, requests, rss))
                for (command, with_index), runs in results.items():
                    secs, reqs, rss = zip(*runs)
                    rows.append({"where": where, "shards": n, "command": command, "index": with_index,
                                 "seconds": {"median": statistics.median(secs), "min": min(secs), "max": max(secs)},
                                 "requests": None if reqs[0] is None else statistics.median(reqs),
                                 "peak_mib": max(rss) / 2 ** 20})
                shutil.rmtree(run, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    return {"environment": environment(), "plan": asdict(o), "rows": rows, "targets": _targets(rows, o.shards)}


def _targets(rows: list[dict], shards) -> dict:
    """Start-up requests per 1,000 shards beyond the smallest store's, and seconds at the largest
    over the smallest, per location and start-up command (with the index)."""
    out = {}
    lo, hi = min(shards), max(shards)
    for r in rows:
        if r["command"] not in START_UP or not r["index"] or r["shards"] != hi or hi == lo:
            continue
        base = next(x for x in rows if (x["where"], x["command"], x["index"], x["shards"]) == (r["where"], r["command"], True, lo))
        key = f"{r['where']}: {r['command']}"
        out[key] = {"seconds_ratio": r["seconds"]["median"] / base["seconds"]["median"]}
        if r["requests"] is not None:
            out[key]["extra_requests_per_1000_shards"] = (r["requests"] - base["requests"]) / ((hi - lo) / 1000)
    return out


def format_scale(d: dict) -> str:
    shards = sorted({r["shards"] for r in d["rows"]})
    env = d["environment"]
    lines = [f"# bench scale: each command a fresh kdcache process; median (min-max) of {d['plan']['repeat']} run(s)",
             f"{env['cpus']} CPUs; torch {env['torch']}, zarr {env['zarr']}; load {env['load_1m_at_start']} at start"]
    for where in dict.fromkeys(r["where"] for r in d["rows"]):
        lines += ["", f"## {where}", "",
                  "| command | shard index | " + " | ".join(f"{n:,} shards: s / requests / peak MiB" for n in shards) + " |",
                  "|---|---|" + "---|" * len(shards)]
        for command, index in dict.fromkeys((r["command"], r["index"]) for r in d["rows"] if r["where"] == where):
            cells = []
            for n in shards:
                r = next((x for x in d["rows"] if (x["where"], x["command"], x["index"], x["shards"]) == (where, command, index, n)), None)
                if r is None:
                    cells.append("-")
                    continue
                s = r["seconds"]
                req = "-" if r["requests"] is None else f"{r['requests']:,.0f}"
                cells.append(f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) / {req} / {r['peak_mib']:.0f}")
            lines.append(f"| {command} | {'yes' if index else 'no'} | " + " | ".join(cells) + " |")
    if d["targets"]:
        lines += ["", "start-up targets: extra requests per 1,000 shards <= 1 (beyond a fixed few), seconds at the largest "
                  "store <= 2x the smallest"]
        for k, t in d["targets"].items():
            extra = t.get("extra_requests_per_1000_shards")
            lines.append(f"- {k}: seconds {t['seconds_ratio']:.2f}x" + ("" if extra is None else f", {extra:.2f} extra "
                                                                           "requests per 1,000 shards"))
    return "\n".join(lines)
