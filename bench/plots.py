"""``kdcache bench plot``: the figures of the docs, drawn from a bench's own ``--json`` output.

Where a curve says more than a table: the loader against the corpus per student input and source
(``bench load``), start-up against the shard count (``bench scale``), held-out fidelity against
bytes per token per quantizer (``bench quantize``). Each reads the JSON as the bench wrote it, so
a figure is redrawn from a rerun with one command; ``bench quality`` draws its own
(``quality.png``). Medians with min-max bars, as every table of the benches.
"""
from __future__ import annotations

import json
import textwrap

from kdcache.errors import KdcacheError

KINDS = ("load", "scale", "quantize")


def plot(kind: str, source: str, out: str) -> str:
    """Draw ``kind`` from the bench JSON at ``source`` into the PNG ``out``; returns ``out``."""
    try:
        with open(source) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"{source}: not a bench's JSON output ({type(e).__name__}: {e})") from None
    draw = {"load": _load, "scale": _scale, "quantize": _quantize}.get(kind)
    if draw is None:
        raise KdcacheError(f"bench plot {kind!r}: expected one of {', '.join(KINDS)}")
    try:
        fig = draw(d)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise KdcacheError(f"{source}: not the JSON of `kdcache bench {kind} --json` ({type(e).__name__}: {e})") from None
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bar(ax, x, spread: dict, width: float, label: str | None, color: str):
    med = spread["median"]
    ax.bar(x, med, width, label=label, color=color, yerr=[[med - spread["min"]], [spread["max"] - med]], capsize=3)


def _load(d: dict):
    """Samples/s of the decode floor, the corpus loader and the store's own view pixels (JPEG, raw)
    per student input: a panel per (workers, target kind) of the pixel table."""
    rows = d["pixels"]
    if not rows:
        raise ValueError("no pixel rows (bench load --pixel-sizes)")
    plt = _pyplot()
    workers = sorted({r.get("workers", 1) for r in rows})
    kinds = [k for k in dict.fromkeys(r.get("targets", "fp16") for r in rows) if k != "-"] or ["fp16"]
    fig, axes = plt.subplots(len(workers), len(kinds), figsize=(5.5 * len(kinds), 3.6 * len(workers)), squeeze=False)
    for (w, kind), ax in zip([(w, k) for w in workers for k in kinds], axes.flat):
        panel = [r for r in rows if r.get("workers", 1) == w and r.get("targets", "fp16") in (kind, "-")]
        sizes = sorted({r["size"] for r in panel})
        sides = list(dict.fromkeys(r["side"] for r in panel))
        width = 0.8 / len(sides)
        for i, side in enumerate(sides):
            for j, size in enumerate(sizes):
                r = next((x for x in panel if x["size"] == size and x["side"] == side), None)
                if r is not None:
                    _bar(ax, j + i * width, r["rate"], width, side if j == 0 else None, f"C{i}")
        ax.set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(sizes))], [f"{s} px student" for s in sizes])
        ax.set(ylabel="samples/s", title=f"{kind} targets, {w} worker{'s' if w > 1 else ''}")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.45)  # room above the tallest bar for the legend
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("The training loader: the corpus vs the store's own view pixels")
    fig.tight_layout()
    return fig


def _scale(d: dict):
    """Seconds to each command's end against the store's shard count, one line per (where, command, index)."""
    rows = d["rows"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = list(dict.fromkeys((r["where"], r["command"], r["index"]) for r in rows))
    for where, command, index in keys:
        pts = sorted((r["shards"], r["seconds"]) for r in rows
                     if (r["where"], r["command"], r["index"]) == (where, command, index))
        xs = [p[0] for p in pts]
        med = [p[1]["median"] for p in pts]
        err = [[m - p[1]["min"] for m, p in zip(med, pts)], [p[1]["max"] - m for m, p in zip(med, pts)]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3,
                    label=f"{where}: {command}" + ("" if index else " (no shard index)"))
    ax.set(xscale="log", yscale="log", xlabel="shards in the store", ylabel="seconds (fresh process)",
           title="Start-up against the shard count")
    ax.legend(fontsize=7)
    return fig


def _quantize(d: dict):
    """Held-out mean cosine against bytes per token, one line per method."""
    rows = d["rows"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["m"], r["mean_cos"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set(xscale="log", xlabel="bytes per token (one-byte codes)", ylabel="held-out mean cosine",
           title="\n".join(textwrap.wrap(f"Fidelity per byte: {d.get('features', '')}", 70)[:2]))
    ax.title.set_fontsize(9)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    return fig
