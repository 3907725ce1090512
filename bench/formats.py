"""``kdcache bench formats``: the kdcache store against the formats users pick today.

The same teacher features of the same samples (every stored view, summary and patch tokens)
are written in five formats, into one temporary directory on one disk:

- the kdcache store, fp16, through the store's shard writer (block checksums and digests
  included), read through its verified block reads (``Store.read_blocks``, the loader's read
  path) streamed per shard and worker with a shuffle buffer;
- the kdcache store with the patch tokens quantized (codes computed beforehand, as
  ``extract --quantize`` does on the device; encode speed is ``bench quantize``'s subject);
- per-sample safetensors inside webdataset tars (the way Theia ships features), written with
  ``webdataset.TarWriter`` and read with ``webdataset.WebDataset`` (split by worker, shuffle
  buffer of the same size);
- one tensors-only torch file per sample (FKD / torchdistill style), read by a map-style
  Dataset with ``torch.load(weights_only=True)``, shuffled by the DataLoader;
- one ``.npy`` file per sample (views x (1 + tokens) x dim), read by a map-style Dataset;
- the loaders users pick (``pip install 'kdcache[peers]'``): Mosaic ``streaming`` (MDS, written
  with ``MDSWriter``, fixed-shape ``ndarray`` columns, no compression, its 64 MB default shards;
  read with its ``StreamingDataset`` (local, shuffled, ``batch_size`` given as its docs ask)
  through a ``DataLoader``) and LitData (written with ``litdata.optimize``, 64 MB chunks; read
  with its ``StreamingDataset`` and ``StreamingDataLoader``, shuffled). Without them their rows
  say so. (mosaicml-streaming caps numpy below 2.2: the extra is kept out of the core install.)

Every read side delivers whole samples (all K views) through its loader with the same worker
count and batch size. Before every timed read the page cache of that format's files is dropped
(``posix_fadvise(DONTNEED)``, no root needed; ``--warm`` instead reads from a warm cache, every
side warmed alike). Columns: bytes on disk per sample, write throughput in MB/s of fp16 features
written (the same numerator for every format), the time to the first batch (worker start-up,
index reads), and read samples/s after the first batch (the steady rate a long run sees). Sides
run interleaved through ``bench.harness``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import load as tensors_from_bytes  # safetensors: tensors only, no pickle
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from kdcache.data.partition import current_worker, worker_share
from kdcache.store import Store, feature_path
from kdcache.store.inspect import info
from kdcache.store.meta import ORIGIN, PIXELS_JPEG

from .harness import Spread, Timed, environment, files_under, header, measure
from .options import FormatsBench
from .peers import PEERS, litdata_dataset, litdata_loader, mds_dataset, peers_installed

SHUFFLE = 64
# the rows whose samples also hold every view's JPEG (extract --pixels), by kind
PIXEL_ROWS = {"store": "kdcache store, fp16 + view JPEGs", "mds": "mosaic streaming (MDS), fp16 + view JPEGs",
              "litdata": "litdata, fp16 + view JPEGs"}


@dataclass
class Features:
    """Every complete shard of one teacher, in memory: what each format writes."""

    meta: object  # StoreMeta of the source
    teacher: str
    shards: dict[str, dict[str, np.ndarray]]  # shard -> {"keys", "views", "<teacher>/cls", "<teacher>/patch", ...}

    @property
    def samples(self) -> int:
        return sum(len(s["keys"]) for s in self.shards.values())

    def fp16_bytes(self) -> int:
        t = self.meta.teachers[self.teacher]
        return self.samples * self.meta.views * (t.tokens + 1) * t.dim * 2


def _with_codec(feats: Features, codec: str) -> Features:
    import dataclasses
    t = dataclasses.replace(feats.meta.teachers[feats.teacher], codec=codec)
    return Features(feats.meta.replace(teachers={**feats.meta.teachers, feats.teacher: t}), feats.teacher, feats.shards)


def read_features(url: str, teacher: str | None = None, *, pixels: bool = False) -> Features:
    """The store's first teacher's arrays per shard (with ``pixels``, every view's JPEG too: the store
    must keep them), and a copy of its metadata that describes exactly that."""
    store = Store.open(url)
    teacher = teacher or next(iter(store.meta.teachers))
    paths = [p for p in store.expected_arrays() if p.startswith(f"{teacher}/")]
    shards = {}
    for name in store.complete_shards([teacher]):
        d = {"keys": store.keys(name), "views": store.views(name)}
        origin = store.origin(name)
        if origin is not None:
            d[ORIGIN] = origin
        if pixels:
            n = len(d["keys"])
            per_view = [store.read_pixels(name, 0, n, view=v) for v in range(store.meta.views)]
            d[PIXELS_JPEG] = [[per_view[v][i] for v in range(store.meta.views)] for i in range(n)]
        for p in paths:
            d[p] = np.concatenate(list(store.read_blocks(name, p)))
        shards[name] = d
    meta = store.meta if pixels else store.meta.replace(pixels=None)
    return Features(meta.replace(teachers={teacher: meta.teachers[teacher]}), teacher, shards)


# ---- writers: (features, destination, source store) -> the files written; only the store uses the source
# (a quantized store's codebooks) ------------------------------------------------------------------------

def write_store(feats: Features, url: str, source: Store | None = None) -> list[str]:
    """The kdcache shard writer; a quantized source's codebooks are copied first."""
    store = Store.create(url, feats.meta)
    t = feats.meta.teachers[feats.teacher]
    for kind in (t.quantizer or {}):
        store.write_codebooks(feats.teacher, kind, source.read_codebooks(feats.teacher, kind))
    for name, arrays in feats.shards.items():
        w = store.new_shard(name, {feats.teacher: t})
        w.append(arrays)
        w.finish()
    return files_under(url)


def _sample_tensors(feats: Features, arrays: dict, i: int) -> dict[str, torch.Tensor]:
    return {p.split("/", 1)[1]: torch.from_numpy(np.ascontiguousarray(arrays[p][i])) for p in arrays if "/" in p}


def write_tars(feats: Features, root: str, source: Store | None = None) -> list[str]:
    import webdataset as wds
    os.makedirs(root, exist_ok=True)
    for name, arrays in feats.shards.items():
        with wds.TarWriter(os.path.join(root, f"{name}.tar")) as sink:
            for i, key in enumerate(arrays["keys"].tolist()):
                sink.write({"__key__": key, "safetensors": safetensors.torch.save(_sample_tensors(feats, arrays, i))})
    return files_under(root)


def _sample_file(root: str, shard: str, key: str, ext: str) -> str:
    """ROOT/SHARD/KEY.EXT; keys may hold '/' (folder corpora), never '..' (data.walk's key rules)."""
    path = os.path.join(root, shard, key + ext)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def write_torch_files(feats: Features, root: str, source: Store | None = None) -> list[str]:
    for name, arrays in feats.shards.items():
        for i, key in enumerate(arrays["keys"].tolist()):
            torch.save(_sample_tensors(feats, arrays, i), _sample_file(root, name, key, ".pt"))
    return files_under(root)


def write_npy_files(feats: Features, root: str, source: Store | None = None) -> list[str]:
    cls, patch = feature_path(feats.teacher, "cls"), feature_path(feats.teacher, "patch")
    for name, arrays in feats.shards.items():
        both = np.concatenate([arrays[cls][:, :, None], arrays[patch]], axis=2)  # (n, K, 1 + T, D)
        for i, key in enumerate(arrays["keys"].tolist()):
            np.save(_sample_file(root, name, key, ".npy"), both[i])
    return files_under(root)


def drop_cache(files: list[str]) -> None:
    """Evict these files' pages from the page cache (clean pages; no root needed)."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- readers: the natural loader of each format ----------------------------------------------

class StoreRows(IterableDataset):
    """Whole samples from a store: verified block reads, shards split per worker, shuffle buffer;
    with ``pixels``, every view's JPEG bytes too (each block's runs read and checked)."""

    def __init__(self, url: str, teacher: str, pixels: bool = False):
        self.url, self.teacher, self.pixels = url, teacher, pixels

    def __iter__(self):
        store = Store.open(self.url)
        worker, workers = current_worker()
        paths = [p for p in store.expected_arrays() if p.startswith(f"{self.teacher}/")]
        buffer, rng = [], np.random.default_rng(worker)
        for name in worker_share(store.complete_shards([self.teacher]), worker, workers):
            blocks = {p: store.read_blocks(name, p) for p in paths}
            block = store.block_rows(name, paths[0])
            for b, rows in enumerate(zip(*blocks.values())):
                views = ([store.read_pixels(name, b * block, b * block + len(rows[0]), view=v)
                          for v in range(store.meta.views)] if self.pixels else None)
                for i in range(len(rows[0])):
                    sample = {p.split("/", 1)[1]: torch.from_numpy(r[i]) for p, r in zip(paths, rows)}
                    if views is not None:
                        sample["jpeg"] = [v[i] for v in views]
                    buffer.append(sample)
                    if len(buffer) >= SHUFFLE:
                        yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer


def _tar_dataset(root: str):
    import webdataset as wds
    urls = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .shuffle(SHUFFLE).map(lambda s: tensors_from_bytes(s["safetensors"])))


class FileSamples(Dataset):
    def __init__(self, files: list[str], load):
        self.files, self.load = sorted(files), load

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.load(self.files[i])


def _load_torch(path: str):
    return torch.load(path, weights_only=True)


def _load_npy(path: str):
    return {"tokens": torch.from_numpy(np.load(path))}


def _store_bytes_per_sample(url: str, teacher: str) -> float:
    """A store's per-sample bytes: its teacher's arrays, and the view pixels it keeps."""
    d = info(Store.open(url))
    pixels = d["pixels"]["bytes"] / d["samples"] if d.get("pixels") and d["samples"] else 0.0
    return d["teachers"][teacher]["bytes_per_sample"] + pixels


def _samples(batch: list) -> dict:
    """The pixel rows' batches, alike for every format: the arrays stacked as torch's default
    collation stacks them (one buffer per field), the JPEGs of each ``jpeg*`` field a list of
    bytes (JPEGs of different lengths do not stack). LitData hands out views of its memory-mapped
    chunks, which a DataLoader worker cannot send: they become bytes (a consumer decoding them
    elsewhere copies them too)."""
    def plain(x):
        if isinstance(x, memoryview):
            return x.tobytes()
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    jpegs = [k for k in batch[0] if k.startswith("jpeg")]
    out = default_collate([{k: v for k, v in sample.items() if k not in jpegs} for sample in batch])
    out.update({k: [plain(sample[k]) for sample in batch] for k in jpegs})
    return out


def _epoch(dataset, *, workers: int, batch_size: int, shuffle: bool, files: list[str], cold: bool, first: list,
           loader=None, collate=None):
    """One epoch: the samples after the first batch, timed from it (``Timed``), and the time to the
    first batch appended to ``first``. ``dataset`` may be a function making it (peers whose
    datasets are built per epoch); ``loader`` makes the loader (default: torch's DataLoader)."""
    import time

    def run():
        if cold:
            drop_cache(files)
        t0 = time.perf_counter()
        ds = dataset() if callable(dataset) and not isinstance(dataset, (Dataset, IterableDataset)) else dataset
        make = loader or (lambda d: DataLoader(d, batch_size=batch_size, num_workers=workers, shuffle=shuffle,
                                               persistent_workers=False, collate_fn=collate))
        n, t1 = 0, None
        for batch in make(ds):
            if t1 is None:
                t1 = time.perf_counter()
                first.append(t1 - t0)
                continue
            n += len(batch) if isinstance(batch, list) else len(batch["key"] if "key" in batch else next(iter(batch.values())))
        return Timed(n, time.perf_counter() - (t1 or t0))
    return run


def run_bench_formats(o: FormatsBench) -> str:
    """``kdcache bench formats``: on ``o.store``, or on the embedded corpus extracted with the shipped
    EfficientNet-Lite0 (``o.images`` images, K = ``o.views``) in a scratch directory."""
    kw = dict(quantize=o.quantize, fraction=o.fraction, teacher=o.teacher, workers=o.workers, batch_size=o.batch_size,
              repeat=o.repeat, cold=not o.warm, tmp=o.tmp, as_json=o.as_json, peers=o.peers, pixels=o.pixels)
    if o.store is not None:
        return bench_formats(o.store, **kw)
    from kdcache.data.demo_corpus import build_demo_corpus
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    from kdcache.models.convert_weights import shipped_teacher
    scratch = tempfile.mkdtemp(prefix="kdcache-formats-source-", dir=o.tmp)
    try:
        corpus, store = f"{scratch}/corpus", f"{scratch}/store.zarr"
        build_demo_corpus(corpus, digits=max(0, o.images - o.images // 4), photos=o.images // 4)
        extract(corpus, store, [shipped_teacher(scratch)], ExtractOptions(views=o.views, progress=False,
                                                                          pixels="" if o.pixels else None))
        return bench_formats(store, **kw)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bench_formats(store: str, *, quantize: str | None = "opq", fraction: int = 32, teacher: str | None = None,
                  workers: int = 1, batch_size: int = 16, repeat: int = 5, cold: bool = True, tmp: str | None = None,
                  as_json: bool = False, peers: bool = True, pixels: bool = True) -> str:
    from kdcache.quantize.convert_store import quantize_store
    from kdcache.quantize.quantizer_spec import QuantizerSpec
    from kdcache.store.ops import copy_stores
    from kdcache.targets.sample import SampleSpec
    feats = read_features(store, teacher)
    opened = Store.open(store)
    pfeats = (read_features(store, teacher, pixels=True) if pixels and opened.meta.pixels is not None
              and opened.meta.pixels.format == "jpeg" else None)
    t = feats.meta.teachers[feats.teacher]
    if t.quantizer:
        raise ValueError(f"--store {store}: teacher {feats.teacher} is quantized; give an fp16 store")
    work = tempfile.mkdtemp(prefix="kdcache-formats-", dir=tmp)
    try:
        qfeats = qsource = None
        if quantize:
            qurl = os.path.join(work, "source-quantized.zarr")
            copy_stores([store], qurl, progress=False)
            m = max(1, 2 * t.dim // fraction)
            tokens = feats.samples * feats.meta.views * t.tokens
            extra = ",opq_iter=10" if quantize == "opq" else ""  # faiss's 50 alternations take many minutes on 2 cores
            quantize_store(qurl, feats.teacher, QuantizerSpec.parse(f"{quantize}:m={m}{extra}"),
                           sample=SampleSpec(train_tokens=min(16384, max(256, tokens * 7 // 8)), pool=1), progress=False)
            qsource = Store.open(qurl)
            qfeats = read_features(qurl, feats.teacher)
            qspec = qsource.meta.teachers[feats.teacher].quantizer["patch"]["spec"]
        formats = {"kdcache store, fp16": ("store", feats, write_store, None)}
        if t.codec != "none":  # what the codec costs or saves on features that barely compress
            formats["kdcache store, fp16, codec none"] = ("store", _with_codec(feats, "none"), write_store, None)
        if qfeats is not None:
            formats[f"kdcache store, {qspec}"] = ("store", qfeats, write_store, qsource)
        formats.update({"safetensors in webdataset tars": ("tars", feats, write_tars, None),
                        "torch file per sample (weights_only)": ("torch", feats, write_torch_files, None),
                        ".npy file per sample": ("npy", feats, write_npy_files, None)})
        installed = peers_installed()
        for name, (kind, _, writer) in PEERS.items():
            if installed[name] and peers:
                formats[name] = (kind, feats, writer, None)
        if pfeats is not None:  # the same samples with every view's JPEG: the store and the peers at equal content
            formats[PIXEL_ROWS["store"]] = ("store", pfeats, write_store, None)
            for name, (kind, _, writer) in PEERS.items():
                if installed[name] and peers:
                    formats[PIXEL_ROWS[kind]] = (kind, pfeats, writer, None)
        written, writes = {}, {}
        for i, (name, (kind, f, writer, src)) in enumerate(formats.items()):
            dst = os.path.join(work, f"{i}-{kind}" + (".zarr" if kind == "store" else ""))

            def write(dst=dst, f=f, writer=writer, src=src, name=name):
                if os.path.exists(dst):
                    shutil.rmtree(dst)
                written[name] = writer(f, dst, src)
                return f.fp16_bytes() / 1e6
            writes[name] = write
        mw = measure(writes, repeat=repeat)
        reads, first = {}, {name: [] for name in formats}
        for i, (name, (kind, f, _, _)) in enumerate(formats.items()):
            files = written[name]
            root = os.path.join(work, f"{i}-{kind}" + (".zarr" if kind == "store" else ""))
            loader = None
            if kind == "store":
                ds, shuffle = StoreRows(root, feats.teacher, pixels=f is pfeats), False
            elif kind == "tars":
                ds, shuffle = _tar_dataset(root), False
            elif kind == "torch":
                ds, shuffle = FileSamples([p for p in files if p.endswith(".pt")], _load_torch), True
            elif kind == "npy":
                ds, shuffle = FileSamples([p for p in files if p.endswith(".npy")], _load_npy), True
            elif kind == "mds":
                ds, shuffle = mds_dataset(root, batch_size), False
            else:
                ds, shuffle = litdata_dataset(root), False
                loader = litdata_loader(batch_size, workers, collate=_samples if f is pfeats else None)
            reads[name] = _epoch(ds, workers=workers, batch_size=batch_size, shuffle=shuffle, files=files, cold=cold,
                                 first=first[name], loader=loader, collate=_samples if f is pfeats else None)
        mr = measure(reads, repeat=repeat)
        first = {name: times[-repeat:] for name, times in first.items()}  # the timed rounds (not the warm-up)
        totals = {name: sum(os.path.getsize(p) for p in files) for name, files in written.items()}
        # a store's per-sample bytes are its shards' teacher arrays; codebooks, statistics and
        # metadata are a fixed cost that a real corpus amortises (reported apart)
        sizes = {name: (_store_bytes_per_sample(os.path.join(work, f"{i}-store.zarr"), feats.teacher)
                        if formats[name][0] == "store" else totals[name] / feats.samples)
                 for i, name in enumerate(formats)}
        fixed = {name: totals[name] - sizes[name] * feats.samples for name in formats}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = list(formats)
    fp16, tars = names[0], "safetensors in webdataset tars"
    peer_names = [n for n in names if n in PEERS]
    fastest_peer = max(peer_names, key=lambda n: mr.rate(n).median) if peer_names else None
    pixel_peers = [n for n in names if n in (PIXEL_ROWS["mds"], PIXEL_ROWS["litdata"])]
    fastest_pixel_peer = max(pixel_peers, key=lambda n: mr.rate(n).median) if pixel_peers else None
    missing = [n for n, ok in peers_installed().items() if not ok] if peers else []
    result = {"environment": environment(), "samples": feats.samples, "views": feats.meta.views, "teacher": feats.teacher,
              "fp16_feature_bytes_per_sample": feats.fp16_bytes() / feats.samples, "workers": workers, "batch_size": batch_size,
              "cache": "dropped before every read (posix_fadvise DONTNEED)" if cold else "warm, every side alike",
              "formats": {n: {"bytes_per_sample": sizes[n], "fixed_bytes": fixed[n], "write_mb_s": mw.rate(n).to_dict(),
                              "read_samples_s": mr.rate(n).to_dict(), "first_batch_s": Spread.of(first[n]).to_dict()}
                          for n in names},
              "store_over_tars_read": mr.ratio(fp16, tars).to_dict(),
              "store_over_tars_bytes": sizes[fp16] / sizes[tars],
              "fastest_peer": fastest_peer, "peers_not_installed": missing,
              "write": mw.to_dict(), "read": mr.to_dict()}
    quantized = next((n for n in names if n.startswith("kdcache store, ") and "fp16" not in n), None)
    if fastest_peer:
        result["store_over_fastest_peer_read"] = mr.ratio(fp16, fastest_peer).to_dict()
        result["store_over_fastest_peer_bytes"] = sizes[fp16] / sizes[fastest_peer]
        if quantized:
            result["codes_over_fastest_peer_read"] = mr.ratio(quantized, fastest_peer).to_dict()
            result["fastest_peer_over_codes_bytes"] = sizes[fastest_peer] / sizes[quantized]
    if fastest_pixel_peer and PIXEL_ROWS["store"] in names:
        result["pixels_store_over_fastest_peer_read"] = mr.ratio(PIXEL_ROWS["store"], fastest_pixel_peer).to_dict()
        result["fastest_pixel_peer"] = fastest_pixel_peer
    if quantized:  # against the features' raw fp16 bytes
        result["fp16_over_quantized_bytes"] = result["fp16_feature_bytes_per_sample"] / sizes[quantized]
    if as_json:
        return json.dumps(result, indent=2)
    lines = [header(f"bench formats: {feats.samples} samples x K={feats.meta.views} views of {feats.teacher} "
                    f"({result['fp16_feature_bytes_per_sample'] / 1024:.1f} KiB fp16 per sample), {workers} worker(s), "
                    f"batch {batch_size}; cache {result['cache']}", result["environment"], repeat=repeat, warmup=mr.warmup),
             "", "| format | KiB/sample on disk | fixed KiB (codebooks, metadata) | write MB/s (fp16 features) | "
                 "first batch s | read samples/s (after the first batch) |",
             "|---|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {sizes[n] / 1024:.1f} | {fixed[n] / 1024:.0f} | {mw.rate(n).fmt(1)} | "
                     f"{Spread.of(first[n]).fmt(2)} | {mr.rate(n).fmt(1)} |")
    r = mr.ratio(fp16, tars)
    lines += ["", f"kdcache fp16 store / tars: read {r.fmt(2)}x, bytes {result['store_over_tars_bytes']:.2f}x"]
    if fastest_peer:
        lines.append(f"kdcache fp16 store / {fastest_peer} (the fastest peer): read "
                     f"{mr.ratio(fp16, fastest_peer).fmt(2)}x (target >= 1.0), bytes {result['store_over_fastest_peer_bytes']:.2f}x "
                     f"(target <= 1)")
        if quantized:
            lines.append(f"{quantized} / {fastest_peer}: read {mr.ratio(quantized, fastest_peer).fmt(2)}x (target >= 1.5), "
                         f"{result['fastest_peer_over_codes_bytes']:.1f}x fewer bytes (target >= 16)")
    if "fp16_over_quantized_bytes" in result:
        lines.append(f"{quantized}: {result['fp16_over_quantized_bytes']:.1f}x smaller than the raw fp16 features "
                     f"(target >= 16; the summary token stays fp16)")
    if "pixels_store_over_fastest_peer_read" in result:
        lines.append(f"{PIXEL_ROWS['store']} / {fastest_pixel_peer} (the same JPEGs and targets, each read by its own "
                     f"loader): read {mr.ratio(PIXEL_ROWS['store'], fastest_pixel_peer).fmt(2)}x (target >= 1.0)")
    if missing:
        lines.append(f"not measured (not installed; pip install 'kdcache[peers]'): {', '.join(missing)}")
    return "\n".join(lines)
