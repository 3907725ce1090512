"""``kdcache bench quality``: is a student trained from the cache as good as one distilled online?

The study is built so that the only difference between a cached run and the online run is that
the cached run reuses K stored draws of the augmentation:

- **Fair.** For each seed s, every store is extracted with view seed s and every run trains with
  seed s, so the online run (``train --online``: view ``e + 1`` of the policy at epoch ``e``) and
  a cached run (``--view-choice augmented``: stored view ``1 + e % (K - 1)``) see *the same* crops
  for their first K - 1 epochs; after that the cached run repeats them. Same student, heads,
  losses, optimizer, steps, batch order and seed. K counts stored views as ``extract --views K``
  does: view 0 is the eval view, so K=1 trains on the eval view alone (the cheapest store) and
  K >= 2 on K - 1 augmented draws. Every JPEG is decoded at full size, in extraction and on both
  sides (a reduced decode's scale depends on the crops it serves, and the online run also cuts
  the teacher's crop), so the student's pixels are bit-identical too.
- **Long enough for views to repeat.** Each K and the online run at every schedule (epochs).
- **Options.** At the longest schedule, on the K = ``option_views`` store: ``--sub-views``,
  ``--cutmix``, ``--mixup``, ``--dense-views`` (a store with ``--dense-scale``), the store's
  patch tokens as OPQ codes at 1/32 of fp16, the student's images from reduced decodes
  (``--decode reduced``, what training's ``auto`` does; the targets the same full-size ones), and
  the student's images from the JPEG view pixels the store keeps (``kdcache store pixels``,
  ``--images store``: no corpus). The codes, the reduced decode and the stored pixels are also
  compared, seed by seed, with the plain run on the same store.
- **Decisive.** Every row over every seed: mean ± sd; the difference to the online run of the same
  seed and schedule (paired) with a 95% t-interval. Each student is scored on every labelled
  image: k-fold kNN (DINO's protocol) and a k-fold linear probe, the same folds for every run.
- **Compute counted.** Teacher images forwarded (counted by the teachers themselves: extraction's
  views and dense maps, the online run's batches and its statistics), extraction wall time,
  training wall time (``fit``), and their sum.

Everything lands in ``OUT`` (stores, runs, ``quality.json``, ``quality.md``, ``quality.png``); an
interrupted study resumes: finished stores, runs and scores are reused.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, replace

import numpy as np

from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.eval.model_features import random_init_student
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.models.convert_weights import shipped_teacher
from kdcache.quantize.convert_store import quantize_store
from kdcache.quantize.quantizer_spec import QuantizerSpec
from kdcache.store import Store
from kdcache.store.inspect import info
from kdcache.store.ops import copy_stores
from kdcache.targets.sample import SampleSpec

from .harness import environment
from .options import QUALITY_OPTIONS, QUALITY_VS_STORE, QualityPlan
from .studies import kfold_scores, model_xy, paired, record, run_scores, same_steps, spread, train_variant, write_study

log = logging.getLogger("kdcache.bench")
ONLINE = "online"


def _store(plan: QualityPlan, out: str, seed: int, views: int, *, dense: bool = False, progress: bool) -> dict:
    """The fp16 store of K=``views`` (view seed ``seed``; with ``dense`` its dense maps too): its
    path, extraction seconds, counted teacher images and stored bytes per image."""
    name = f"fp16-k{views}{'-dense' if dense else ''}-s{seed}"
    path = os.path.join(out, "stores", f"{name}.zarr")

    def make():
        shutil.rmtree(path, ignore_errors=True)  # an interrupted extraction: timed from scratch
        t0 = time.perf_counter()
        s = extract(plan.corpus, path, [plan.teacher], ExtractOptions(
            views=views, seed=seed, batch_size=32, workers=plan.workers, progress=progress, decode="full",
            dense_scale=plan.dense_scale if dense else 0))
        d = info(Store.open(path))
        return {"path": path, "extract_seconds": time.perf_counter() - t0, "teacher_images": s.teacher_images,
                "bytes_per_image": sum(t["bytes_per_sample"] for t in d["teachers"].values())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return record(os.path.join(out, "stores", f"{name}.json"), make)


def _quantized(plan: QualityPlan, out: str, base: dict, seed: int, *, progress: bool) -> dict:
    """A copy of ``base`` with its patch tokens as OPQ codes at 1/32 of fp16 (M = dim / 16 bytes)."""
    path = os.path.join(out, "stores", f"opq-1of32-k{plan.option_views}-s{seed}.zarr")

    def make():
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        copy_stores([base["path"]], path, progress=False)
        teacher, meta = next(iter(Store.open(path).meta.teachers.items()))
        quantize_store(path, teacher, QuantizerSpec.parse(f"opq:m={max(1, meta.dim // 16)},opq_iter=10"),
                       sample=SampleSpec(train_tokens=plan.train_tokens, pool=1, seed=seed), progress=progress)
        d = info(Store.open(path))
        return {"path": path, "extract_seconds": base["extract_seconds"] + time.perf_counter() - t0,
                "teacher_images": base["teacher_images"], "bytes_per_image": d["teachers"][teacher]["bytes_per_sample"]}
    return record(os.path.join(out, "stores", f"opq-1of32-k{plan.option_views}-s{seed}.json"), make)


def _with_pixels(plan: QualityPlan, out: str, base: dict, seed: int, *, progress: bool) -> dict:
    """A copy of ``base`` given every view's pixels (``kdcache store pixels``: the teacher's input
    size, JPEG at the default quality), so a student trains from the store alone."""
    from kdcache.extract.store_pixels import add_pixels
    path = os.path.join(out, "stores", f"pixels-k{plan.option_views}-s{seed}.zarr")

    def make():
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        copy_stores([base["path"]], path, progress=False)
        add_pixels(path, plan.corpus, None, workers=plan.workers, progress=progress)
        d = info(Store.open(path))
        return {"path": path, "extract_seconds": base["extract_seconds"] + time.perf_counter() - t0,
                "teacher_images": base["teacher_images"],
                "bytes_per_image": sum(t["bytes_per_sample"] for t in d["teachers"].values())
                + d["pixels"]["bytes"] / max(1, d["samples"])}
    return record(os.path.join(out, "stores", f"pixels-k{plan.option_views}-s{seed}.json"), make)


def _defaults(plan: QualityPlan, out: str) -> QualityPlan:
    if plan.corpus is None:
        corpus = os.path.join(out, "corpus")
        if not os.path.isdir(corpus):
            build_demo_corpus(corpus, digits=plan.digits, photos=plan.photos, shard_size=96)
        plan = replace(plan, corpus=corpus)
    if plan.teacher is None:
        plan = replace(plan, teacher=f"{shipped_teacher(out)},img_size={plan.teacher_size}")
    return plan


def quality_study(out: str, plan: QualityPlan = QualityPlan(), *, progress: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    plan = _defaults(plan, out)
    longest = max(plan.schedules)
    runs = []  # one per (variant, schedule, seed)

    def train(variant: str, epochs: int, seed: int, store: dict | None, **kw):
        run_dir = os.path.join(out, "runs", f"{variant.replace(' ', '-').replace('/', 'of')}-e{epochs}-s{seed}")
        source = dict(store=store["path"], view_choice="augmented") if store else dict(store="", online=True,
                                                                                          teachers=(plan.teacher,))
        r = train_variant(run_dir, progress=progress, data=plan.corpus, student=plan.student, epochs=epochs,
                          batch_size=plan.batch_size, workers=plan.workers, lr=plan.lr, warmup_steps=4,
                          head_hidden=plan.head_hidden, log_every=10, seed=seed, **source, **{"decode": "full", **kw})
        runs.append({"variant": variant, "epochs": epochs, "seed": seed, "run": run_dir, "steps": r["steps"],
                     "fit_seconds": r["fit_seconds"],
                     # cached: the store's extraction; online: its own forward passes (statistics included)
                     "teacher_images": store["teacher_images"] if store else r["teacher_images"],
                     "extract_seconds": store["extract_seconds"] if store else 0.0,
                     "bytes_per_image": store["bytes_per_image"] if store else None,
                     **run_scores(run_dir, plan.corpus, folds=plan.folds)})

    for seed in plan.seeds:
        stores = {k: _store(plan, out, seed, k, progress=progress) for k in plan.views}
        for epochs in plan.schedules:
            train(ONLINE, epochs, seed, None)
            for k in plan.views:
                train(f"K={k}", epochs, seed, stores[k])
        base = stores.get(plan.option_views)
        for option in plan.options:
            if option == "dense":
                store = _store(plan, out, seed, plan.option_views, dense=True, progress=progress)
            elif option == "opq 1/32":
                store = _quantized(plan, out, base, seed, progress=progress)
            elif option == "stored pixels":
                store = _with_pixels(plan, out, base, seed, progress=progress)
            else:
                store = base
            train(f"K={plan.option_views} {option}", longest, seed, store, **QUALITY_OPTIONS[option])
    for epochs in plan.schedules:
        same_steps([r for r in runs if r["epochs"] == epochs])
    random_init = random_init_student(runs[0]["run"], seed=0)
    base_scores = kfold_scores(**model_xy(random_init, plan.corpus), folds=plan.folds)
    result = {"plan": asdict(plan), "environment": environment(), "runs": runs, "rows": summarize(runs, plan),
              "random_init": base_scores}
    write_study(out, "quality", result, format_quality(result))
    result["plot"] = plot_quality(result, os.path.join(out, "quality.png"))
    return result


def summarize(runs: list[dict], plan: QualityPlan) -> list[dict]:
    """One row per (variant, schedule): mean ± sd over seeds, paired differences to the online run
    of the same seed and schedule (and, for the codes, to the fp16 store they came from)."""
    by = {}
    for r in runs:
        by.setdefault((r["variant"], r["epochs"]), {})[r["seed"]] = r
    rows = []
    for (variant, epochs), seeds in by.items():
        online = by[(ONLINE, epochs)]
        common = sorted(set(seeds) & set(online))
        pick = lambda rs, key: [rs[s][key] for s in common]  # noqa: E731
        row = {"variant": variant, "epochs": epochs, "seeds": common, "steps": seeds[common[0]]["steps"]}
        for key in ("knn", "linear", "teacher_images", "extract_seconds", "fit_seconds"):
            row[key] = spread(pick(seeds, key))
        row["total_seconds"] = spread([a + b for a, b in zip(pick(seeds, "extract_seconds"), pick(seeds, "fit_seconds"))])
        row["bytes_per_image"] = seeds[common[0]]["bytes_per_image"]
        if variant != ONLINE:
            for key in ("knn", "linear"):
                row[f"{key}_vs_online"] = paired(pick(seeds, key), pick(online, key))
                base = spread(pick(online, key))["mean"]
                row[f"{key}_over_online"] = row[key]["mean"] / base if base else None  # (a tiny study's probe may score 0)
            row["forwards_over_online"] = row["teacher_images"]["mean"] / spread(pick(online, "teacher_images"))["mean"]
            row["seconds_over_online"] = row["total_seconds"]["mean"] / spread(pick(online, "fit_seconds"))["mean"]
        same_store = by.get((f"K={plan.option_views}", epochs))
        if any(variant.endswith(o) for o in QUALITY_VS_STORE) and same_store:
            base = spread([same_store[s]["knn"] for s in common])["mean"]
            row["knn_over_store"] = row["knn"]["mean"] / base if base else None
            row["knn_vs_store"] = paired(pick(seeds, "knn"), [same_store[s]["knn"] for s in common])
            row["linear_vs_store"] = paired(pick(seeds, "linear"), [same_store[s]["linear"] for s in common])
        rows.append(row)
    return rows


def format_quality(r: dict) -> str:
    p = r["plan"]
    ms = lambda s, d=3: f"{s['mean']:.{d}f} ± {s['sd']:.{d}f}"  # noqa: E731
    ci = lambda x: "-" if x is None else f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"  # noqa: E731
    num = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# quality: {p['student']} from {p['teacher'].split(',')[0]} ({p['teacher_size'] if 'effnet' in p['teacher'] else ''}"
             f"), {len(p['seeds'])} seeds per row (mean ± sd), paired differences to online with 95% intervals",
             f"every labelled image scored by {p['folds']}-fold kNN (k=20, T=0.07) "
             f"and a {p['folds']}-fold linear probe; random-init student: kNN {r['random_init']['knn']:.3f}, "
             f"linear {r['random_init']['linear']:.3f} ({r['random_init']['n']} images)", "",
             "| epochs | variant | steps | kNN | kNN / online | kNN - online | linear | linear - online | "
             "teacher images | / online | extract s | train s | total s / online | KiB/image stored |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(r["rows"], key=lambda x: (x["epochs"], x["variant"] != ONLINE)):
        kib = None if row["bytes_per_image"] is None else row["bytes_per_image"] / 1024
        lines.append(f"| {row['epochs']} | {row['variant']} | {row['steps']} | {ms(row['knn'])} | "
                     f"{num(row.get('knn_over_online'), 3)} | {ci(row.get('knn_vs_online'))} | {ms(row['linear'])} | "
                     f"{ci(row.get('linear_vs_online'))} | {row['teacher_images']['mean']:,.0f} | "
                     f"{num(row.get('forwards_over_online'), 3)} | {row['extract_seconds']['mean']:.0f} | "
                     f"{row['fit_seconds']['mean']:.0f} | {num(row.get('seconds_over_online'))} | {num(kib, 1)} |")
    for row in (row for row in r["rows"] if "knn_over_store" in row):
        lines += ["", f"{row['variant']} at {row['epochs']} epochs against K={p['option_views']} (the same store, full-size "
                      f"decodes, fp16), seed by seed: kNN {num(row['knn_over_store'], 3)}x, difference "
                      f"{ci(row['knn_vs_store'])}; linear {ci(row.get('linear_vs_store'))}"]
    return "\n".join(lines)


def plot_quality(r: dict, path: str) -> str:
    """kNN against epochs, a line per K and for online, bands of ± sd; the options as points at the
    longest schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for row in r["rows"]:
        lines.setdefault(row["variant"], []).append(row)
    for variant, rows in lines.items():
        rows.sort(key=lambda x: x["epochs"])
        e = [x["epochs"] for x in rows]
        m = np.array([x["knn"]["mean"] for x in rows])
        sd = np.array([x["knn"]["sd"] for x in rows])
        if len(rows) > 1:
            ax.plot(e, m, marker="o", label=variant, lw=2.5 if variant == ONLINE else 1.5,
                    color="black" if variant == ONLINE else None)
            ax.fill_between(e, m - sd, m + sd, alpha=0.15, color="black" if variant == ONLINE else None)
        else:
            ax.errorbar(e, m, yerr=sd, fmt="s", capsize=3, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"{r['plan']['folds']}-fold kNN top-1 (mean ± sd over seeds)")
    ax.set_title(f"{r['plan']['student']}: cached K views vs online")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
