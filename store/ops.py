"""Store operations (``kdcache store ...``): copy, merge, subset, drop a teacher, list shards.

Every operation reads its sources through the verified paths (``read_block``, digests) and
writes shard by shard under a lease, marking each shard complete last, so an interrupted copy
resumes where it stopped and a reader never sees half a shard. A copied shard is verified in
its new place before the next one starts.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import time

from tqdm import tqdm

from kdcache.errors import StoreError

from .inspect import shard_nbytes, write_summary
from .layout import sealed
from .lease import new_owner
from .meta import ORIGIN, PIXEL_ARRAYS, PIXELS_JPEG, TOKEN_KINDS, StoreMeta, has_pixels, feature_path, has_teacher, has_view_axis, per_view_shards
from .checks import block_crcs
from .remote import is_url, local_path
from .store import Store, ensure_group
from .verify import verify_shard

log = logging.getLogger("kdcache.store")


def compatible(a: StoreMeta, b: StoreMeta, *, a_name: str, b_name: str) -> None:
    """Stores whose shards may live in one store: same format, views, corpus and teachers. A
    refusal names both stores, each with its own value (the differing fields only)."""
    def differ(field: str, x, y) -> None:
        raise StoreError(f"{a_name} and {b_name}: {field} differs ({a_name}: {_short(x)}; {b_name}: {_short(y)})")

    if a.format != b.format:
        differ("format", a.format, b.format)
    if a.pixels != b.pixels:
        differ("pixels", a.pixels and a.pixels.to_dict(), b.pixels and b.pixels.to_dict())
    if a.view_policy != b.view_policy:
        x, y = a.view_policy.to_dict(), b.view_policy.to_dict()
        keys = [k for k in x if x[k] != y.get(k)]
        differ("view policy", {k: x[k] for k in keys}, {k: y.get(k) for k in keys})
    if a.corpus.get("fingerprint") != b.corpus.get("fingerprint"):
        differ("corpus fingerprint", a.corpus.get("fingerprint"), b.corpus.get("fingerprint"))
    if sorted(a.teachers) != sorted(b.teachers):
        differ("teachers", sorted(a.teachers), sorted(b.teachers))
    for t in a.teachers:
        x, y = a.teachers[t].to_dict(), b.teachers[t].to_dict()
        if x != y:
            keys = sorted(k for k in x if y.get(k) != x[k])
            differ(f"teacher {t}", {k: x[k] for k in keys}, {k: y.get(k) for k in keys})


def copy_stores(sources: list[str], dst_url: str, *, shards: str | None = None, progress: bool = True,
                store_format: int | None = None) -> dict:
    """Copy the complete shards of ``sources`` (matching the glob ``shards``) into ``dst_url``.

    One source: ``copy`` (or ``subset`` with a pattern). Several: ``merge``: their shards must be
    disjoint, or identical (same digests); any other overlap is refused naming the shard,
    before anything is written. ``store_format``: the destination's format (the sources' when
    None); the arrays are laid out as it says, their digests unchanged, their checksums recomputed
    from the verified rows."""
    for u in sources:
        if same_place(u, dst_url):
            raise StoreError(f"--out {dst_url}: the destination is the source store {u}; copy to another place")
    srcs = [Store.open(u, index=False) for u in sources]  # copied from their own metadata
    for s in srcs[1:]:
        compatible(srcs[0].meta, s.meta, a_name=srcs[0].url, b_name=s.url)
    plan: dict[str, Store] = {}
    for s in srcs:
        for name in s.complete_shards():
            if shards and not fnmatch.fnmatchcase(name, shards):
                continue
            if name in plan:
                if _digests(plan[name], name) != _digests(s, name):
                    raise StoreError(f"shard {name}: in {plan[name].url} and {s.url} with different data; refusing to merge")
                continue
            plan[name] = s
    if shards and not plan:
        raise StoreError(f"--shards {shards!r}: no complete shard of {', '.join(sources)} matches")
    meta = srcs[0].meta if store_format is None else srcs[0].meta.replace(format=store_format)
    if meta.format < 3:
        meta = meta.replace(pixels=None)
    if shards:
        meta = meta.replace(corpus={**meta.corpus, "subset": shards})
    dst = _open_destination(dst_url, meta)
    for s in srcs:
        for t in meta.teachers:
            for kind in TOKEN_KINDS:
                cb = s.read_codebooks(t, kind)
                if cb is not None and dst.read_codebooks(t, kind) is None:
                    dst.write_codebooks(t, kind, cb)
                st = s.read_stats(t, kind)
                if st is not None and dst.read_stats(t, kind) is None:
                    dst.write_stats(t, kind, mean=st["mean"], covariance=st["covariance"], count=st["count"],
                                    attrs={k: v for k, v in st["attrs"].items() if k not in ("count", "ready")})
    leases = dst.leases(new_owner(), pid=os.getpid())
    copied, skipped, moved_on = [], [], []
    for name, src in tqdm(sorted(plan.items()), desc=f"copy to {dst.url}", unit="shard", disable=not progress):
        if dst.is_complete(name) and _digests(dst, name) == _digests(src, name):
            skipped.append(name)
        elif (holder := leases.acquire(name)) is not None:
            log.info("shard %s is being written by %s; moving on", name, holder.describe())
            moved_on.append(name)
        else:
            try:
                _copy_shard(src, dst, name)
            finally:
                leases.release(name)
            copied.append(name)
    write_summary(dst)
    return {"store": dst.url, "shards_copied": len(copied), "shards_already_there": len(skipped),
            "shards_left_to_another_job": moved_on, "bytes": sum(shard_nbytes(dst, n) for n in copied)}


def _open_destination(url: str, meta: StoreMeta) -> Store:
    if Store.exists(url):
        dst = Store.open(url, writable=True)
        compatible(meta, dst.meta, a_name="the source", b_name=f"{url} (destination)")
        return dst
    if not is_url(url) and os.path.isdir(local_path(url)) and os.listdir(local_path(url)):
        raise StoreError(f"{url}: directory exists, is not empty and is not a kdcache store")
    return Store.create(url, meta)


def _digests(store: Store, shard: str) -> dict:
    return (store.shard_attrs(shard) or {}).get("digest", {})


def same_place(a: str, b: str) -> bool:
    """Whether two store locations are one (local paths resolved; URLs compared as written)."""
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))


def _copy_shard(src: Store, dst: Store, name: str) -> None:
    """Arrays first, each block read through the source's checks; attributes (complete) last. A
    shard a reader would refuse is refused before anything is written: its record checked as
    ``verify`` checks it (binding, a digest and checksums for every array), its data block by
    block as it is read, the copy verified in full."""
    problems = verify_shard(src, name, data=False)
    if problems:
        raise StoreError(f"{src.url}: {problems[0]}; not copied (kdcache verify lists every problem)")
    attrs = src.shard_attrs(name)
    if not dst.meta.records_origin:  # a format before 3 has no origin nor pixels (its readers would refuse them)
        attrs = {**{k: v for k, v in attrs.items() if k != "block"},
                 "digest": {p: d for p, d in attrs["digest"].items() if p != ORIGIN and p not in PIXEL_ARRAYS},
                 "block_crc32": {p: c for p, c in (attrs.get("block_crc32") or {}).items() if p not in PIXEL_ARRAYS}}
    dst.delete_shard(name)
    group = ensure_group(dst.root, "shards").create_group(name, attributes={"complete": False})
    # laid out as in the source: the views' boxes, and the JPEG heap's runs (one per block and view of its rows)
    crcs = {p: c for p, c in (attrs.get("block_crc32") or {}).items() if p in ("views", ORIGIN, PIXELS_JPEG)}
    for path in ["keys", "views", *[p for p in attrs["digest"] if p not in ("keys", "views")]]:
        a = src.array(name, path)
        shards, chunks = getattr(a, "shards", None), a.chunks
        per_view = bool(shards) and per_view_shards(path, views=dst.meta.views, view_shards=dst.meta.view_shards)
        if shards and has_view_axis(path):  # laid out as the destination's format says
            width = 1 if per_view else a.shape[1]
            shards, chunks = (shards[0], width, *shards[2:]), (chunks[0], width, *chunks[2:])
        out = group.create_array(path, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                                 compressors=a.compressors, attributes=dict(a.attrs))
        if path in ("keys", "views", ORIGIN):
            rows = src.keys(name) if path == "keys" else src.views(name) if path == "views" else src.origin(name)
            out[...] = rows
            continue
        if path == PIXELS_JPEG:  # the JPEG heap, byte for byte, one Zarr shard at a time (its digest checked below)
            for start in range(0, a.shape[0], a.shards[0]):
                out[start:start + a.shards[0]] = a[start:start + a.shards[0]]
            continue
        start, crcs[path] = 0, []
        for rows in src.read_blocks(name, path):
            out[start:start + len(rows)] = rows
            start += len(rows)
            crcs[path] += block_crcs(rows, per_view=per_view)
    # complete, count, failed, digests (the rows' own: unchanged by the layout), checksums: last, in one write
    group.attrs.put(sealed(name, {**attrs, "block_crc32": crcs}))  # bound anew, from rows read verified
    problems = verify_shard(dst, name)
    if problems:
        raise StoreError(f"{dst.url}: shard {name} does not verify after the copy: {problems[0]}")


def drop_teacher(url: str, teacher: str) -> dict:
    """Remove a teacher: from the metadata first (readers stop expecting it), then per shard its
    digest entries (one atomic write) and arrays, then its quantizers and statistics."""
    store = Store.open(url, writable=True)
    if teacher not in store.meta.teachers:
        raise StoreError(f"{url}: no teacher {teacher!r} (teachers: {', '.join(store.meta.teachers)})")
    if len(store.meta.teachers) == 1:
        raise StoreError(f"{url}: {teacher} is the store's only teacher; delete the store instead")
    live = {n: h for n, h in store.leases("drop-teacher").all().items() if h.expires > time.time()}
    if live:
        name, h = next(iter(live.items()))
        raise StoreError(f"{url}: shard {name} is being written by {h.describe()}; drop the teacher when no job writes")
    store.write_meta(store.meta.replace(teachers={n: t for n, t in store.meta.teachers.items() if n != teacher}))
    paths = {feature_path(teacher, k, codes=c) for k in TOKEN_KINDS for c in (False, True)}
    n = 0
    for name in store.shard_names():
        n += store.drop_arrays(name, paths)
    store.drop_teacher_groups(teacher)
    write_summary(store)  # the shard index, without the teacher's arrays
    return {"store": url, "teacher": teacher, "shards": n}


def list_shards(url: str) -> dict:
    """``kdcache store ls``: every shard with its state, samples, bytes, teachers and lease."""
    store = Store.open(url)
    leases = store.leases("reader").all()
    rows = []
    for name in store.shard_names():
        a = store.shard_summary(name) or {}
        digest = a.get("digest", {})
        h = leases.get(name)
        rows.append({"shard": name, "state": "complete" if a.get("complete") is True else "incomplete",
                     "samples": a.get("count"), "failed": a.get("failures", 0), "bytes": shard_nbytes(store, name),
                     "pixels": has_pixels(digest),
                     "teachers": [t for t in store.meta.teachers if has_teacher(digest, t)],
                     "lease": None if h is None else {"owner": h.owner, "host": h.host, "pid": h.pid,
                                                      "expires": h.expires, "expired": h.expires < time.time()}})
    return {"store": url, "shards": rows}


def format_ls(d: dict) -> str:
    lines = [f"{'shard':<24} {'state':<10} {'samples':>8} {'failed':>6} {'MiB':>9}  teachers  pixels  lease"]
    for r in d["shards"]:
        lease = "-" if r["lease"] is None else (f"{r['lease']['owner'][:8]} pid {r['lease']['pid']} on {r['lease']['host']}"
                                                + (" (expired)" if r["lease"]["expired"] else ""))
        lines.append(f"{r['shard']:<24} {r['state']:<10} {r['samples'] if r['samples'] is not None else '-':>8} "
                     f"{r['failed']:>6} {r['bytes'] / 2**20:>9.2f}  {','.join(r['teachers']) or '-'}  "
                     f"{'yes' if r['pixels'] else '-':<6}  {lease}")
    return "\n".join(lines)


def _short(x) -> str:
    r = repr(x)
    return r if len(r) < 160 else r[:157] + "..."
