"""Reports on a store: ``info`` (what is in it, how big); ``verify`` lives in ``verify.py``.

``write_summary`` refreshes what the root keeps about the shards, written after them (by rank 0,
a later run, a store operation, ``store stats``): the summary in the root metadata and the shard
index (``shard_index.py``).
"""
from __future__ import annotations

import time

from kdcache.errors import StoreError, one_line

from .meta import has_pixels
from .shard_index import INDEX_ATTR, agrees, entry_of, index_lease
from .store import Store


def shard_nbytes(store: Store, shard: str) -> int:
    return sum(store.shard_nbytes(shard).values())


def scan(store: Store) -> dict:
    """Counts over all shards: complete / incomplete, samples, failures (a reader asks the shard
    index, one request for all of them; a writer, or a store opened without the index, each
    shard); ``broken``: shards whose own metadata a reader refuses, with why (found where the
    shard's own metadata was read)."""
    complete, incomplete, broken, samples, failed = [], [], {}, 0, 0
    for name in store.shard_names():
        try:
            a = store.shard_summary(name) or {}
        except StoreError as e:
            broken[name] = one_line(e)
            continue
        if a.get("complete") is True:
            complete.append(name)
            samples += a["count"]
            failed += a["failures"]
        else:
            incomplete.append(name)
    return {"complete": complete, "incomplete": incomplete, "broken": broken, "samples": samples, "failed": failed}


def write_summary(store: Store) -> dict:
    """The root summary and the shard index, from every shard's own metadata (an index entry
    that still agrees with its shard keeps its sizes: they are not measured again). Written
    under the index lease; entries another job merged meanwhile, for shards this scan saw
    incomplete, are kept (each reader checks them against their shards anyway)."""
    old = store.stored_index(warn=False) or {}
    names = store.shard_names()
    entries = {}
    for name in names:
        try:
            a = store.shard_attrs(name)
        except StoreError:  # refused by every reader: left out of the index (readers then ask it, and refuse it)
            continue
        if a and a.get("complete") is True:
            entries[name] = (old[name] if name in old and agrees(old[name], a) else entry_of(a, store.array_nbytes(name)))
    with index_lease(store):
        fresh = store.stored_index(warn=False) or {}
        entries.update({n: e for n, e in fresh.items() if n in names and n not in entries})
        store.write_index(entries)  # the index first: the summary never counts shards the index lacks
    summary = {"shards_complete": len(entries), "shards_incomplete": len(names) - len(entries),
               "samples": sum(e["count"] for e in entries.values()), "failed": sum(e["failures"] for e in entries.values()),
               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_meta(store.meta.replace(summary=summary))
    return summary


def info(store: Store) -> dict:
    """Everything ``kdcache info`` prints, as a JSON-able dict."""
    s = scan(store)
    meta = store.meta
    indexed = 0
    for sh in s["complete"]:  # a count its arrays do not hold would be a wrong number: checked on the keys' shape
        if store.shard_summary(sh).get("indexed"):  # (the index's entries were written from the arrays)
            indexed += 1
        else:
            store.array(sh, "keys")
    sizes = [store.shard_nbytes(sh) for sh in s["complete"]]
    by_prefix = lambda p: sum(v for d in sizes for k, v in d.items() if k.startswith(p))  # noqa: E731
    teachers = {}
    total = 0
    for name, t in meta.teachers.items():
        nbytes = by_prefix(f"{name}/")
        total += nbytes
        teachers[name] = {
            "model": t.model, "dim": t.dim, "grid": list(t.grid), "tokens": t.tokens, "prefix_tokens": t.prefix_tokens,
            "input_size": list(t.input_size), "dtype": t.dtype, "codec": t.codec, "quantizer": t.quantizer,
            "bytes": nbytes, "bytes_per_sample": nbytes / s["samples"] if s["samples"] else 0.0,
            "raw_bytes_per_sample": meta.views * (t.tokens + 1) * t.dim * (4 if t.dtype == "float32" else 2),
            "shards_with_teacher": sum(store.is_complete(sh, [name]) for sh in s["complete"]),
            "logits": None,
        }
        teachers[name]["dense"] = None
        if t.dense:  # the dense maps' share of the teacher's bytes, per image
            dense = by_prefix(f"{name}/dense")
            teachers[name]["dense"] = {**t.dense, "bytes": dense,
                                       "bytes_per_image": dense / s["samples"] if s["samples"] else 0.0}
        if t.logits:  # the soft labels' share of the teacher's bytes, per stored view
            soft = by_prefix(f"{name}/logits_")
            teachers[name]["logits"] = {**t.logits, "bytes": soft,
                                        "bytes_per_view": soft / (s["samples"] * meta.views) if s["samples"] else 0.0}
    index_bytes = by_prefix("keys") + by_prefix("views") + by_prefix("origin")
    pixels = None
    if meta.pixels is not None:  # every view's crop (extract --pixels): bytes per stored view
        nbytes = by_prefix("pixels/")
        with_pixels = sum(has_pixels(store.shard_summary(sh).get("digest", {})) for sh in s["complete"])
        pixels = {**meta.pixels.to_dict(), "bytes": nbytes, "shards_with_pixels": with_pixels,
                  "bytes_per_view": nbytes / (s["samples"] * meta.views) if s["samples"] and with_pixels else 0.0}
        total += nbytes
    return {
        "store": store.url, "format": meta.format, "created_by": meta.created_by,
        "views": meta.views, "seed": meta.seed, "view_policy": meta.view_policy.to_dict(), "corpus": meta.corpus,
        "shards_complete": len(s["complete"]), "shards_incomplete": len(s["incomplete"]),
        "incomplete": s["incomplete"], "broken": s["broken"], "samples": s["samples"], "failed": s["failed"],
        "shards_from_index": indexed, "checked": not store.use_index,
        "root_digest": (store.root.attrs.get(INDEX_ATTR) or {}).get("sha256"),
        "bytes": total + index_bytes, "teachers": teachers, "pixels": pixels,
    }


def format_info(d: dict) -> str:
    lines = [
        f"store      {d['store']}  (format {d['format']}, {d['created_by']})",
        f"corpus     {d['corpus'].get('spec')}  ({d['corpus'].get('kind')}, {d['corpus'].get('shards')} shards, fingerprint {d['corpus'].get('fingerprint')})",
        f"views      K={d['views']} seed={d['seed']} ({d['view_policy']['kind']}, view 0 crop_pct={d['view_policy']['crop_pct']})",
        f"shards     {d['shards_complete']} complete, {d['shards_incomplete']} incomplete"
        + (f", {len(d['broken'])} whose own metadata every reader refuses (first: {next(iter(d['broken'].items()))[1]})"
           if d.get("broken") else ""),
        f"samples    {d['samples']} ({d['failed']} failed at extraction)",
        f"on disk    {_mib(d['bytes'])}",
    ]
    if d.get("shards_from_index"):
        lines.append(f"index      {d['shards_from_index']} of {d['shards_complete']} complete shards described by the shard "
                     f"index alone (one request; info --check reads every shard's own metadata, kdcache verify every byte)")
    elif d.get("checked"):
        lines.append("index      not used: every shard's own metadata read (--check)")
    if d.get("root_digest"):
        lines.append(f"pin        {d['root_digest']}  (the shard index's sha256: kdcache verify --pin checks a copy against it)")
    if d.get("pixels"):
        px = d["pixels"]
        how = f"JPEG quality {px['quality']}" if px["format"] == "jpeg" else "raw uint8"
        lines.append(f"pixels     every view's crop at {px['size'][0]}x{px['size'][1]} ({how}, {px['interpolation']}), "
                     f"{px['bytes_per_view'] / 1024:.1f} KiB/view, in {px['shards_with_pixels']}/{d['shards_complete']} "
                     f"shards: trains without the corpus")
    lines.append("teachers")
    for n, t in d["teachers"].items():
        lines.append(f"  {n:<10} {t['model']}  dim={t['dim']} grid={t['grid'][0]}x{t['grid'][1]} (+{t['prefix_tokens']} prefix) "
                     f"{t['dtype']}/{t['codec']}  {_mib(t['bytes'])}  {t['bytes_per_sample'] / 1024:.1f} KiB/sample "
                     f"(raw {t['raw_bytes_per_sample'] / 1024:.1f} KiB)  in {t['shards_with_teacher']}/{d['shards_complete']} shards")
        if t.get("dense"):
            de = t["dense"]
            lines.append(f"  {'':<10} dense maps: the whole image at {de['scale']}x the input, {de['grid'][0]}x{de['grid'][1]} "
                         f"tokens, {de['bytes_per_image'] / 1024:.1f} KiB/image on disk")
        if t.get("logits"):
            lo = t["logits"]
            lines.append(f"  {'':<10} soft labels: top-{lo['k']} of {lo['classes']} classes ({lo['index_dtype']} indices), "
                         f"{lo['bytes_per_view']:.1f} B/view on disk")
        for kind, q in (t["quantizer"] or {}).items():
            lines.append(f"  {'':<10} {kind} codes: {q.get('spec') or q['method'] + ':M=' + str(q['m'])}, {q['bytes_per_token']} B/token = "
                         f"1/{q['compression_vs_fp16']:.0f} of fp16, 1/{q['compression_vs_fp32']:.0f} of fp32; held-out "
                         f"relMSE {q['relmse']:.4f}, mean cos {q['mean_cos']:.4f}, p5 cos {q['p5_cos']:.4f}"
                         + ("; floats kept" if q.get("keep_float") else ""))
    return "\n".join(lines)


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def describe_store(url: str, *, check: bool = False) -> dict:
    """``kdcache info``: ``info`` of the store at ``url`` plus its text rendering under ``text``;
    ``check``: from every shard's own metadata, not the shard index (a request per shard)."""
    d = info(Store.open(url, index=not check))
    return {**d, "text": format_info(d)}
