"""``kdcache eval store``: what a store costs per sample, and what quantization kept.

Per teacher: bytes on disk per sample (every stored array of the teacher: floats and/or codes),
the ratio to the same features in fp32, and for quantized token kinds the reconstruction
fidelity: measured here on the stored floats when they were kept (``--keep-float``), decoded
codes against them, over the first shards (up to ``tokens``); else the held-out figures the
quantizer recorded when it was trained.
"""
from __future__ import annotations

import numpy as np

from kdcache.quantize.reconstruction import reconstruction_fidelity
from kdcache.store import Store, feature_path
from kdcache.store.dtypes import itemsize
from kdcache.store.inspect import info

from .options import STORE_REPORT_TOKENS as TOKENS


def store_report(url: str, *, tokens: int = TOKENS) -> dict:
    store = Store.open(url)
    d = info(store)
    out = {"store": url, "samples": d["samples"], "views": d["views"], "teachers": {},
           "shards_from_index": d["shards_from_index"], "shards_complete": d["shards_complete"], "broken": d["broken"]}
    for name, t in d["teachers"].items():
        meta = store.meta.teachers[name]
        fp32 = d["views"] * (meta.tokens + 1) * meta.dim * 4
        row = {"model": t["model"], "bytes_per_sample": t["bytes_per_sample"], "fp32_bytes_per_sample": fp32,
               "fp32_over_stored": fp32 / t["bytes_per_sample"] if t["bytes_per_sample"] else None, "quantized": {}}
        for kind, q in (meta.quantizer or {}).items():
            cb = store.read_codebooks(name, kind)
            entry = {"spec": q.get("spec"), "bytes_per_token": cb.m}
            if q.get("keep_float"):
                x, y = _float_and_decoded(store, name, kind, cb, tokens)
                entry.update({"measured_on": f"{len(x)} stored tokens (floats kept)", **reconstruction_fidelity(x, y)})
            else:
                entry.update({"measured_on": "held-out tokens at training (floats not kept)",
                              **{k: q.get(k) for k in ("relmse", "mean_cos", "p5_cos")}})
            row["quantized"][kind] = entry
        if meta.logits:  # soft labels: top-K values (storage dtype) + class indices + one float32 log-sum-exp, per view
            lo = meta.logits
            raw = lo["k"] * (itemsize(meta.dtype) + np.dtype(lo["index_dtype"]).itemsize) + 4
            row["logits"] = {**lo, "bytes_per_view": t["logits"]["bytes_per_view"], "raw_bytes_per_view": raw}
        if meta.dense:  # one map per image: beside the K stored views it costs this much
            de, per_view = meta.dense, (t["bytes_per_sample"] - t["dense"]["bytes"] / max(1, d["samples"])) / d["views"]
            codes = bool((meta.quantizer or {}).get("patch"))
            row["dense"] = {**de, "bytes_per_image": t["dense"]["bytes_per_image"], "codes": codes,
                            "raw_fp16_bytes_per_image": de["grid"][0] * de["grid"][1] * meta.dim * 2,
                            "stored_views_equivalent": t["dense"]["bytes_per_image"] / per_view if per_view else None}
        out["teachers"][name] = row
    if d.get("pixels"):  # every view's crop (extract --pixels): what the store alone trains from
        px = d["pixels"]
        out["pixels"] = {**px, "raw_bytes_per_view": px["size"][0] * px["size"][1] * 3}
    return out


def _float_and_decoded(store: Store, teacher: str, kind: str, cb, tokens: int):
    xs, ys, n = [], [], 0
    for shard in store.complete_shards([teacher]):
        x = store.read_features(shard, teacher, kind)
        codes = np.concatenate(list(store.read_blocks(shard, feature_path(teacher, kind, codes=True))))
        xs.append(x.reshape(-1, x.shape[-1]))
        ys.append(cb.decode(codes.reshape(-1, codes.shape[-1])))
        n += len(xs[-1])
        if n >= tokens:
            break
    return np.concatenate(xs)[:tokens], np.concatenate(ys)[:tokens]


def format_store_report(r: dict) -> str:
    lines = [f"# store {r['store']}: {r['samples']} samples, K={r['views']} views", ""]
    if r.get("shards_from_index"):  # (what the index says is what every shard says, until a shard is read)
        lines += [f"Counts of {r['shards_from_index']} of {r['shards_complete']} complete shards from the shard index "
                  f"alone; `kdcache info --check` reads every shard's own metadata.", ""]
    if r.get("broken"):
        lines += [f"{len(r['broken'])} shard(s) whose own metadata every reader refuses (first: "
                  f"{next(iter(r['broken'].values()))}).", ""]
    lines += ["| teacher | model | KiB/sample stored | KiB/sample fp32 | fp32 / stored | quantized | relMSE | mean cos | p5 cos |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in r["teachers"].items():
        q = t["quantized"] or {"-": {}}
        for kind, e in q.items():
            fid = [f"{e[k]:.4f}" if isinstance(e.get(k), (int, float)) else "-" for k in ("relmse", "mean_cos", "p5_cos")]
            what = f"{kind}: {e.get('spec')} ({e.get('measured_on')})" if e else "-"
            lines.append(f"| {name} | {t['model']} | {t['bytes_per_sample'] / 1024:.1f} | {t['fp32_bytes_per_sample'] / 1024:.1f} | "
                         f"{t['fp32_over_stored']:.1f} | {what} | " + " | ".join(fid) + " |")
    soft = [(name, t["logits"]) for name, t in r["teachers"].items() if t.get("logits")]
    if soft:
        lines += ["", "| teacher | soft labels | B/view stored | B/view raw |", "|---|---|---|---|"]
        lines += [f"| {name} | top-{lo['k']} of {lo['classes']} classes ({lo['index_dtype']} indices) | "
                  f"{lo['bytes_per_view']:.1f} | {lo['raw_bytes_per_view']} |" for name, lo in soft]
    dense = [(name, t["dense"]) for name, t in r["teachers"].items() if t.get("dense")]
    if dense:
        lines += ["", "| teacher | dense map | KiB/image stored | KiB/image raw fp16 | = stored views of this store |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {de['scale']}x input, {de['grid'][0]}x{de['grid'][1]} tokens{', codes' if de['codes'] else ''} | "
                  f"{de['bytes_per_image'] / 1024:.1f} | {de['raw_fp16_bytes_per_image'] / 1024:.1f} | "
                  f"{'-' if de['stored_views_equivalent'] is None else format(de['stored_views_equivalent'], '.1f')} |"
                  for name, de in dense]
    if r.get("pixels"):
        px = r["pixels"]
        lines += ["", "| view pixels | KiB/view stored | KiB/view raw uint8 | shards |", "|---|---|---|---|",
                  f"| {px['size'][0]}x{px['size'][1]} {px['format']}{' q' + str(px['quality']) if px['format'] == 'jpeg' else ''}"
                  f" | {px['bytes_per_view'] / 1024:.2f} | {px['raw_bytes_per_view'] / 1024:.2f} | "
                  f"{px['shards_with_pixels']} |"]
    return "\n".join(lines)
