"""``kdcache bench load``: the training loader's samples/s and MB/s, verification on and off,
from a local store and the same store on an S3-compatible server (a loopback moto server the
bench starts, or a URL you give), beside the decode floor, all sides interleaved
(``bench.harness``); kdcache's block read (``store.zarr_shards``) against zarr's own ``Array``
read of the same blocks, with the requests each makes on S3; the store's own view pixels against
the corpus loader; then full-size against reduced JPEG decodes per image size (``bench.jpeg_decodes``).

Each loader side streams epochs of the real loader (corpus shard and store shard together,
view replay, targets as stored bytes) through a DataLoader as training builds it (its workers
persistent across epochs, as in ``train.fit``): a timed run is whole epochs lasting at least
``--seconds`` (``harness.lasting``), timed from each epoch's first batch to its last (``_side``);
MB/s counts the target bytes delivered. Beside
the fp16 summary and patch tokens: the same loader with no target arrays at all (the store's keys
and views only: what the loader costs before it reads a target byte), and, when the store holds
them (the store this bench builds keeps both, ``--codes``), the patch tokens as codes. The
**decode floor** is the same epoch with nothing but the corpus: the same shards, workers, shuffle
buffer and batches, each sample decoded and its view cut at the student's input (the loader's own
crops: a store of one view holds view 0, which replays from key and size; ``_floor_views``)
(``--student-size``, 64 px by default: the cheapest decode, so the largest share for the
targets; as the store records the decode), no store at all; the loader's share of it is what reading and
checking the targets costs (target >= 0.9). Verification is the per-block CRC-32 and finiteness
check every training run does; the target is that it costs at most 5% of loader throughput.

"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.demo_corpus import build_demo_corpus, photo_images, write_tar
from kdcache.data.partition import ShardRows
from kdcache.data.pixels import Crop, corpus_places
from kdcache.data.stream import SampleStream, StreamSpec, shard_rows
from kdcache.data.transport import release_batch, stop_workers, training_loader
from kdcache.errors import KdcacheError
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.store.meta import feature_path
from kdcache.store.ops import copy_stores

from .jpeg_decodes import decode_table
from .harness import Spread, Timed, environment, header, lasting, limit_note, loader_cpu_seconds, measure
from .options import LoadBench


def _stream(store_url: str, store: Store, corpus, *, paths, verify: bool, workers: int, batch_size: int, input_size: int,
            floor: bool = False, source: str = "corpus") -> SampleStream:
    """A side's stream, as training builds it: the store's shards, the student's crop, a window of 64.
    ``floor``: the decode floor, the same epoch with nothing but the corpus: each sample's fresh view
    cut at the student's input, its image's place from a walk of the corpus done here (no store)."""
    places = corpus_places(corpus) if floor else None
    shards = (tuple(ShardRows(n, len(p), store.shard_block(n)) for n, p in places.items()) if floor
              else shard_rows(store, store.complete_shards()))
    spec = StreamSpec(shards=shards,
                      crops=(("image", Crop((input_size, input_size), "bilinear")),),
                      decode=replace(ReadOptions.from_dict(store.meta.corpus).decode, reduced=True),  # as train --decode auto
                      views=_floor_views(store) if floor else "stored", stored_views=store.meta.views,
                      policy=store.meta.view_policy,
                      window=64, batch_size=batch_size, workers=workers, store_url=None if floor else store_url,
                      target_paths=paths, verify=verify, source=source)
    return SampleStream(spec, corpus, places=places)


def _floor_views(store: Store) -> str:
    """The floor's views, the same boxes as the loader's where the store allows: a store of one view
    holds view 0, the eval view, which replays from key and image size alone ("eval"), so the floor
    decodes and cuts exactly the loader's crops; with K > 1 the loader's view changes per block and
    epoch, and the floor cuts fresh views of the same policy (their crops' sizes, and so the decode
    scale, then differ from the loader's)."""
    return "eval" if store.meta.views == 1 else "fresh"


def _side(store_url: str, data: str | None, *, paths: tuple[str, ...], verify: bool, workers: int, batch_size: int,
          input_size: int = 64, floor: bool = False, source: str = "corpus"):
    """One side's epoch, one per call: the cached loader reading ``paths`` (none: keys and views
    only), or with ``floor`` the decode floor (the corpus alone), each sample's view cut at the
    student's ``input_size``; each batch released as training releases it after its step. Timed
    from the epoch's first batch to its last (``Timed``: the samples after the first batch): an
    epoch's start (its workers' first blocks read and decoded before a batch leaves) is paid once
    per epoch, which the bench's epochs of a thousand samples would pay every 64 batches and a
    training epoch once in thousands; it is kept apart, ``run.starts`` (seconds to each epoch's
    first batch). ``run.bytes_per_sample``: the target bytes it delivered; ``run.image_shape``:
    its images'."""
    store = Store.open(store_url)
    corpus = resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus)) if source == "corpus" else None
    stream = _stream(store_url, store, corpus, paths=paths, verify=verify, workers=workers, batch_size=batch_size,
                     input_size=input_size, floor=floor, source=source)
    epochs = _epochs(stream, workers=workers, batch_size=batch_size)

    def run() -> Timed:
        n = nbytes = 0
        before = loader_cpu_seconds(epochs.loader)
        t0 = time.perf_counter()
        first = None  # (when the epoch's first batch came, samples in it)
        for batch in epochs():
            if first is None:
                first = (time.perf_counter(), len(batch["key"]))
            n += len(batch["key"])
            nbytes += sum(batch[p].numel() * batch[p].element_size() for p in paths)
            run.image_shape = tuple(batch["image"].shape[1:])
            release_batch(batch)
        end = time.perf_counter()
        run.bytes_per_sample = nbytes / max(1, n)
        after = loader_cpu_seconds(epochs.loader)
        if before is not None and after is not None:
            run.cpu_seconds += after - before
            run.cpu_samples += n
        if first is None or first[1] == n:  # no batch, or one: the whole epoch
            return Timed(n, end - t0)
        run.starts.append(first[0] - t0)
        return Timed(n - first[1], end - first[0])  # the samples after the first batch, in the time after it
    run.bytes_per_sample, run.image_shape, run.loader, run.starts = 0.0, None, epochs.loader, []
    run.cpu_seconds, run.cpu_samples = 0.0, 0
    return run


def _epochs(stream: SampleStream, *, workers: int, batch_size: int):
    """A side's epochs, one per call, through training's own DataLoader (``data.transport.training_loader``:
    workers kept from epoch to epoch, batch buffers reused; a worker started per epoch would time
    the fork and its copy-on-write faults, not the reads). Every sample counts."""
    loader = training_loader(stream, batch_size=batch_size, workers=workers)
    epoch = itertools.count()

    def next_epoch():
        stream.set_epoch(next(epoch))
        return iter(loader)
    next_epoch.loader = loader
    return next_epoch


def target_paths(store: Store) -> dict[str, tuple[str, ...]]:
    """The first teacher's summary and patch tokens as the store holds them: {"fp16": float
    arrays, "codes": the patch codes}, each when present."""
    teacher = next(iter(store.meta.teachers))
    held = store.expected_arrays()
    out = {}
    for name, codes in (("fp16", False), ("codes", True)):
        paths = (feature_path(teacher, "cls"), feature_path(teacher, "patch", codes=codes))
        if all(p in held for p in paths):
            out[name] = paths
    return out


def bench_load(o: LoadBench = LoadBench()) -> str:
    store, data, workers, batch_size, s3, repeat, as_json = o.store, o.data, o.workers, o.batch_size, o.s3, o.repeat, o.as_json
    with tempfile.TemporaryDirectory() as tmp:
        if store is None:
            data = f"{tmp}/corpus"
            build_demo_corpus(data, digits=0, photos=o.images, shard_size=o.shard_size)
            store = f"{tmp}/store.zarr"
            codes = None if o.codes == "none" else o.codes
            extract(data, store, [o.teacher], ExtractOptions(progress=False, batch_size=16, quantize=codes, keep_float=True,
                                                             views=o.views))
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
        opened = Store.open(store)
        held, views, fmt = target_paths(opened), opened.meta.view_policy.views, opened.meta.format
        if "fp16" not in held:
            raise KdcacheError(f"--store {store}: its first teacher's float summary and patch tokens are not stored "
                               f"(a store of codes only: extract it with --keep-float)")
        try:
            one = dict(data=data, workers=workers, batch_size=batch_size, input_size=o.student_size)
            sides = {FLOOR: _side(store, paths=(), verify=True, floor=True, **one),
                     NO_TARGETS: _side(store, paths=(), verify=True, **one)}
            for where, url in locations.items():
                for verify in (True, False):
                    sides[f"{where}, verification {'on' if verify else 'off'}"] = _side(url, paths=held["fp16"], verify=verify,
                                                                                        **one)
                if where == "local" and "codes" in held:
                    sides[CODES] = _side(url, paths=held["codes"], verify=True, **one)
            timed = {name: lasting(side, o.seconds) for name, side in sides.items()}
            m = measure(timed, repeat=repeat)
            reads = block_read_table(locations, held["fp16"], repeat=repeat, server=server)
            pixels = pixel_table(tmp, o) if o.pixel_sizes else []
        finally:
            if server is not None:
                server.stop()
    per_sample = sides["local, verification on"].bytes_per_sample
    env = environment()
    ratios = {where: m.ratio(f"{where}, verification on", f"{where}, verification off") for where in locations}
    of_floor = m.ratio("local, verification on", FLOOR)
    shares = {name: m.ratio(name, FLOOR) for name in (NO_TARGETS, CODES) if name in sides}
    decodes = decode_table(o.decode_sizes, student=o.student_size, images=o.decode_images, repeat=repeat)
    if as_json:
        return json.dumps({"environment": env, "workers": workers, "batch_size": batch_size, "bytes_per_sample": per_sample,
                           "stored_views": views, "store_format": fmt, "student_size": o.student_size,
                           "image_shapes": {name: side.image_shape for name, side in sides.items()},
                           "seconds": o.seconds, "epochs_per_run": {name: t.passes[0] for name, t in timed.items()},
                           "first_batch_ms": {name: _start_ms(side) for name, side in sides.items()},
                           "measurement": m.to_dict(), "verified_over_unverified": {w: r.to_dict() for w, r in ratios.items()},
                           "loader_over_decode_floor": of_floor.to_dict(),
                           "over_decode_floor": {name: r.to_dict() for name, r in shares.items()}, "decode": decodes,
                           "pixels": pixels, "block_reads": reads}, indent=2)
    lines = [header(f"bench load: samples/s from each epoch's first batch to its last, whole epochs per timed run, at "
                    f"least {o.seconds:g} s ({_span(t.passes[0] for t in timed.values())} epochs), "
                    f"{workers} worker(s), batch {batch_size}, "
                    f"{o.student_size}-px student input, {per_sample / 1024:.1f} KiB of targets per sample, "
                    f"{views} stored view(s) per image, "
                    f"{'one read per block and epoch' if fmt >= 2 else 'each read'} (store format {fmt})",
                    env, repeat=repeat, warmup=m.warmup),
             "", "| side | samples/s | target MB/s | ms to an epoch's first batch |", "|---|---|---|---|"]
    for name, side in sides.items():
        lines.append(f"| {name} | {m.rate(name).fmt(1)} | {m.rate(name).fmt(2, side.bytes_per_sample / 1e6)} | "
                     f"{_fmt_ms(_start_ms(side))} |")
    lines.append("")
    lines.append(f"loader (local, verified) / decode floor = {of_floor.fmt(3)} (target >= 0.9)")
    for name, r in shares.items():
        lines.append(f"{name} / decode floor = {r.fmt(3)}")
    for where, r in ratios.items():
        lines.append(f"{where}: verified / unverified throughput = {r.fmt(3)} (target >= 0.95)")
        n = limit_note(r, f"{where} verified/unverified")
        if n:
            lines.append(n)
    if note:
        lines.append(note)
    lines += ["", "## Every fp16 block of the store, one view at a time, unverified: kdcache's read (one request per "
              "block, decoded by store.zarr_shards) against zarr's own Array read of the same rows", "",
              "| where | kdcache MB/s | zarr Array MB/s | kdcache / zarr | requests per block, kdcache / zarr |",
              "|---|---|---|---|---|"]
    for r in reads:
        req = "-" if r["requests_per_block"] is None else \
            f"{r['requests_per_block']['kdcache']:.1f} / {r['requests_per_block']['zarr']:.1f}"
        lines.append(f"| {r['where']} | {_fmt(r['kdcache_mb_s'], 1)} | {_fmt(r['zarr_mb_s'], 1)} | "
                     f"{_fmt(r['kdcache_over_zarr'], 2)} | {req} |")
    if pixels:
        lines += ["", f"## The store's own view pixels (extract --pixels) against the corpus: {o.pixel_images} photos at "
                  f"{o.pixel_long_side} px, per workers, student input and targets (interleaved per worker count; each "
                  f"timed run whole epochs lasting at least {o.seconds:g} s: {_span(row['epochs_per_run'] for row in pixels)} "
                  f"epochs)", "",
                  "| workers | student input | targets | side | samples/s | / corpus loader | CPU us per sample "
                  "| corpus loader's CPU / this | KiB per sample read | ms to first batch |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in pixels:
            cpu, per = row.get("cpu_us_per_sample"), row.get("cpu_over_corpus")
            lines.append(f"| {row['workers']} | {row['size']} px | {row['targets']} | {row['side']} | {_fmt(row['rate'], 1)} | "
                         f"{'-' if row['over_corpus'] is None else _fmt(row['over_corpus'], 2)} | "
                         f"{'-' if cpu is None else f'{cpu:,.0f}'} | {'-' if per is None else f'{per:.2f}'} | "
                         f"{row['kib_per_sample']:.1f} | {_fmt_ms(row['first_batch_ms'])} |")
        lines.append("targets: stored 64-px JPEG views >= 5x the corpus loader, stored 224-px >= 2x")
    lines += ["", f"## JPEG decode + one {o.student_size}-px RandomResizedCrop view, one process, {o.decode_images} images "
              "per side, img/s", "", "| long side | PIL full | kdcache full | kdcache reduced | reduced / PIL full "
              "| reduced / kdcache full |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['long_side']} px | {_fmt(r['pil_full'])} | {_fmt(r['full'])} | {_fmt(r['reduced'])} "
              f"| {_fmt(r['reduced_over_pil_full'], 2)} | {_fmt(r['reduced_over_full'], 2)} |" for r in decodes]
    lines += ["", "## The decode alone (the view given, as the cached loader reads it), img/s", "",
              "| long side | PIL full | kdcache full | kdcache reduced | reduced / PIL full |", "|---|---|---|---|---|"]
    lines += [f"| {r['long_side']} px | {_fmt(r['pil_full_decode'])} | {_fmt(r['full_decode'])} | {_fmt(r['reduced_decode'])} "
              f"| {_fmt(r['reduced_decode_over_pil_full_decode'], 2)} |" for r in decodes]
    lines.append("target: reduced >= 2x PIL full for a 64-px student on 500-px JPEGs")
    return "\n".join(lines)


def _start_ms(side) -> dict | None:
    """A side's milliseconds from an epoch's start to its first batch: median, min, max, over every
    epoch but its first (which also starts what persists: the loader's workers, the opened arrays)."""
    starts = side.starts[1:]
    return Spread.of([s * 1e3 for s in starts]).to_dict() if starts else None


def _span(counts) -> str:
    """``a-b``: the fewest and most of ``counts`` (``a`` when they are one)."""
    low, high = min(counts := list(counts)), max(counts)
    return f"{low}" if low == high else f"{low}-{high}"


def _fmt_ms(spread: dict | None) -> str:
    return "-" if spread is None else _fmt(spread, 1)


def photo_corpus(out: str, *, images: int, long_side: int, shard_size: int = 64, seed: int = 0) -> str:
    """A corpus of camera-size JPEGs: random crops (at least half of each side) of scikit-learn's and
    scikit-image's photos, resized to ``long_side`` px, quality 92, in tars of ``shard_size``."""
    photos, rng, samples = photo_images("all"), np.random.default_rng(seed), []
    for i in range(images):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        t, l = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(img[t:t + ch, l:l + cw])
        scale = long_side / max(ch, cw)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        samples.append((f"photo_{i:05d}", np.asarray(crop), i % len(photos), "jpg"))
    os.makedirs(out, exist_ok=True)
    for s in range(0, len(samples), shard_size):
        write_tar(os.path.join(out, f"photos-{s // shard_size:06d}.tar"), samples[s:s + shard_size])
    return out


def pixel_table(tmp: str, o: LoadBench) -> list[dict]:
    """The student's images from the store's own crops against the corpus, on camera-size JPEGs.

    A corpus of ``o.pixel_images`` photos at ``o.pixel_long_side`` px (``photo_corpus``; the main
    store's small crops decode too cheaply to say what a real corpus costs), extracted with the
    bench's teacher and codes; then, per worker count of ``o.pixel_workers``, per student input S
    of ``o.pixel_sizes`` and per target kind (fp16 summary and patches, or the patch codes): the
    corpus loader (each view cut from its image), the decode floor at S, and the store's own crops
    at S as JPEG (quality 90) and raw (copies given their pixels by ``kdcache store pixels``: one
    decode pass, no teacher). One interleaved measurement per worker count; each row with its bytes
    read per sample and its CPU per sample (``harness.loader_cpu_seconds``)."""
    from kdcache.extract.store_pixels import add_pixels
    from kdcache.store.inspect import info
    data = photo_corpus(f"{tmp}/photos", images=o.pixel_images, long_side=o.pixel_long_side)
    store = f"{tmp}/photos.zarr"
    codes = None if o.codes == "none" else o.codes
    extract(data, store, [o.teacher], ExtractOptions(progress=False, batch_size=16, quantize=codes, keep_float=True,
                                                     views=1))
    held = target_paths(Store.open(store))
    copies = {}
    for size in o.pixel_sizes:
        for fmt in ("jpeg", "raw"):
            url = copies[(size, fmt)] = f"{tmp}/photos-{fmt}-{size}.zarr"
            copy_stores([store], url, progress=False)
            add_pixels(url, data, f"{size}:{fmt}", workers=max(o.pixel_workers), progress=False)
    rows = []
    for workers in o.pixel_workers:
        sides, meta = {}, {}
        for size in o.pixel_sizes:
            base = dict(verify=True, workers=workers, batch_size=o.batch_size, input_size=size)
            sides[f"{size}/floor"] = _side(store, data=data, paths=(), floor=True, **base)
            meta[f"{size}/floor"] = (size, "-", "decode floor (decode + view, no store)", 0.0)
            for kind, paths in (("fp16", held["fp16"]), ("codes", held.get("codes"))):
                if not paths:
                    continue
                sides[f"{size}/{kind}/corpus"] = _side(store, data=data, paths=paths, **base)
                meta[f"{size}/{kind}/corpus"] = (size, kind, "corpus loader (each view cut from its image)", 0.0)
                for fmt in ("jpeg", "raw"):
                    url = copies[(size, fmt)]
                    sides[f"{size}/{kind}/{fmt}"] = _side(url, data=None, paths=paths, source="pixels", **base)
                    per_view = info(Store.open(url))["pixels"]["bytes_per_view"]
                    meta[f"{size}/{kind}/{fmt}"] = (size, kind, f"the store's {'JPEG (quality 90)' if fmt == 'jpeg' else 'raw'} "
                                                                f"view pixels", per_view)
        timed = {name: lasting(side, o.seconds) for name, side in sides.items()}
        m = measure(timed, repeat=o.repeat)
        cpu = {name: side.cpu_seconds / side.cpu_samples * 1e6 if side.cpu_samples else None for name, side in sides.items()}
        for name, side in sides.items():
            size, kind, label, px_bytes = meta[name]
            corpus = f"{size}/{kind}/corpus"
            store_side = name != corpus and kind != "-"
            rows.append({"workers": workers, "size": size, "targets": kind, "side": label, "rate": m.rate(name).to_dict(),
                         "over_corpus": m.ratio(name, corpus).to_dict() if store_side else None,
                         "kib_per_sample": (px_bytes + side.bytes_per_sample) / 1024, "image_shape": side.image_shape,
                         "epochs_per_run": timed[name].passes[0], "first_batch_ms": _start_ms(side),
                         "cpu_us_per_sample": cpu[name],  # the corpus loader's over it: what a core buys
                         "cpu_over_corpus": cpu[corpus] / cpu[name] if store_side and cpu[corpus] and cpu[name] else None})
        for side in sides.values():  # this worker count's loaders end here (data.transport.stop_workers)
            stop_workers(side.loader)
    return rows


def block_read_table(locations: dict[str, str], paths, *, repeat: int, server=None) -> list[dict]:
    """Per location: every block of ``paths`` in every complete shard, one view at a time (as a
    training worker reads them), by kdcache's read (``Store.read_block``: one request, the Zarr
    shard decoded by ``store.zarr_shards``) and by zarr's own ``Array`` for the same rows;
    checks off on both sides (the read alone). On the loopback S3 server, the requests each side
    makes per block too (one untimed pass each)."""
    rows = []
    for where, url in locations.items():
        store = Store.open(url)
        work = []  # (shard, path, block, view, the array)
        for shard in store.complete_shards():
            for path in paths:
                a = store.array(shard, path)
                block = store.block_rows(shard, path, array=a)
                views = a.shape[1] if a.ndim > 1 else 1
                work += [(shard, path, b, v, a, block) for b in range(-(-a.shape[0] // block)) for v in range(views)]
        nbytes = sum(min(blk, a.shape[0] - b * blk) * np.dtype(a.dtype).itemsize * int(np.prod(a.shape[2:]))
                     for _, _, b, _, a, blk in work)

        def ours():
            for shard, path, b, v, a, _ in work:
                store.read_block(shard, path, b, array=a, verify=False, view=v, attrs={})
            return nbytes / 1e6

        def zarrs():
            for _, _, b, v, a, block in work:
                np.asarray(a[b * block:(b + 1) * block, v])
            return nbytes / 1e6
        m = measure({"kdcache": ours, "zarr": zarrs}, repeat=repeat)
        requests = None
        if server is not None and where.startswith("s3"):
            requests = {}
            for name, fn in (("kdcache", ours), ("zarr", zarrs)):
                server.reset()
                fn()
                requests[name] = server.requests() / max(1, len(work))
        rows.append({"where": where, "blocks": len(work), "megabytes": nbytes / 1e6, "kdcache_mb_s": m.rate("kdcache").to_dict(),
                     "zarr_mb_s": m.rate("zarr").to_dict(), "kdcache_over_zarr": m.ratio("kdcache", "zarr").to_dict(),
                     "requests_per_block": requests})
    return rows


FLOOR = "decode floor (decode + view, no store)"
NO_TARGETS = "local, no target arrays (keys and views only)"
CODES = "local, patch codes, verification on"


def _fmt(d: dict, digits: int = 0) -> str:
    return f"{d['median']:,.{digits}f} ({d['min']:,.{digits}f}-{d['max']:,.{digits}f})"


def _loopback_s3(store: str):
    """Start a moto S3 server on 127.0.0.1 and copy the store there; (server, url) or (None, None)."""
    try:
        import s3fs

        from .s3_server import LoopbackS3, use_for_s3
        server = LoopbackS3()
    except ImportError:
        return None, None
    use_for_s3(server.endpoint)
    s3fs.S3FileSystem().mkdir("kdcache-bench")
    url = "s3://kdcache-bench/store.zarr"
    copy_stores([store], url, progress=False)
    return server, url
