"""``kdcache bench quality``: is a student trained from the cache as good as one distilled online?

One run, one corpus, one teacher, one student, the same optimizer steps for every variant:

- **online**: ``train --online`` (the teacher live, a fresh view every epoch): the reference;
- **fp16 K=k**: a store with k stored views per image, for each k in ``views``;
- **METHOD 1/F**: the fp16 store with ``quantized_views`` views, its patch tokens quantized to
  1/F of their fp16 bytes (M = 2 * dim / F bytes per token), for each method and F;
- **predict codes**: one quantized store (the first method at the largest F) with
  ``--predict-codes`` (256-way cross-entropy per codebook instead of regression);
- the **random-init** student and the **teacher's** cached features, for scale.

Each student is scored by kNN (``eval knn``: DINO protocol, the same seeded split) on the
corpus; the table gives top-1/top-5, the ratio to the online run and to the fp16 store it was
derived from, the target bytes per sample, and the wall time of the training loop (``fit``:
for the online run that includes the teacher's forward passes; a cached run's teacher cost
was paid once, at extraction, reported separately). Everything lands in ``OUT`` (stores, runs,
``quality.json``, ``quality.md``); an interrupted study resumes: finished stores and runs are
reused.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict

from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.eval.model_features import probe_model
from kdcache.eval.options import ProbeOptions
from kdcache.eval.store_features import probe_store
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
from .options import QUALITY_METHODS, QualityPlan
from .studies import knn_protocol, same_steps, train_variant, write_study

log = logging.getLogger("kdcache.bench")


def _train(plan: QualityPlan, out: str, *, progress: bool, **kw) -> dict:
    return train_variant(out, progress=progress, data=plan.corpus, student=plan.student, epochs=plan.epochs,
                         batch_size=plan.batch_size, workers=plan.workers, lr=plan.lr, warmup_steps=4,
                         head_hidden=plan.head_hidden, log_every=5, seed=plan.seed, **kw)


def _store(plan: QualityPlan, out: str, views: int, progress: bool) -> tuple[str, float]:
    path = os.path.join(out, f"fp16-k{views}.zarr")
    done = os.path.join(out, f"fp16-k{views}.json")  # the first extraction's time, kept for a resumed study
    if os.path.exists(done) and Store.exists(path):
        with open(done) as f:
            return path, json.load(f)["extract_seconds"]
    t0 = time.perf_counter()
    extract(plan.corpus, path, [plan.teacher], ExtractOptions(views=views, seed=plan.seed, batch_size=32, workers=plan.workers,
                                                             progress=progress))
    seconds = time.perf_counter() - t0
    with open(done, "w") as f:
        json.dump({"extract_seconds": seconds}, f)
    return path, seconds


def _quantized(plan: QualityPlan, out: str, base: str, method: str, fraction: int, progress: bool) -> str:
    store = Store.open(base)
    teacher, meta = next(iter(store.meta.teachers.items()))
    m = max(1, 2 * meta.dim // fraction)
    path = os.path.join(out, f"{method}-1of{fraction}-k{plan.quantized_views}.zarr")
    if not (os.path.exists(path) and Store.open(path).meta.teachers[teacher].quantizer):
        if os.path.exists(path):
            import shutil
            shutil.rmtree(path)
        copy_stores([base], path, progress=False)
        quantize_store(path, teacher, QuantizerSpec.parse(QUALITY_METHODS[method].format(m=m)),
                       sample=SampleSpec(train_tokens=plan.train_tokens, pool=1), progress=progress)
    return path


def quality_study(out: str, plan: QualityPlan = QualityPlan(), *, progress: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    if plan.corpus is None:
        corpus = os.path.join(out, "corpus")
        build_demo_corpus(corpus, digits=plan.digits, photos=plan.photos)
        plan = QualityPlan(**{**asdict(plan), "corpus": corpus})
    if plan.teacher is None:
        plan = QualityPlan(**{**asdict(plan), "teacher": shipped_teacher(out)})
    stores, extract_seconds = {}, {}
    for k in plan.views:
        stores[k], extract_seconds[k] = _store(plan, out, k, progress)
    teacher = next(iter(Store.open(stores[plan.views[0]]).meta.teachers))
    rows = []

    def add(name, kind, run_dir, store=None, **train_kw):
        r = _train(plan, run_dir, progress=progress, store=store or "", **train_kw)
        knn = probe_model("run", plan.corpus, ProbeOptions(seed=plan.seed), run=run_dir)
        per_sample = None
        if store:
            d = info(Store.open(store))
            per_sample = d["teachers"][teacher]["bytes_per_sample"] / d["views"]
        rows.append({"variant": name, "kind": kind, "store": store, "run": run_dir, "steps": r["steps"],
                     "fit_seconds": r["fit_seconds"], "bytes_per_view": per_sample, "top1": knn["top1"], "top5": knn["top5"]})

    add("online", "online", os.path.join(out, "run-online"), online=True, teachers=(plan.teacher,))
    for k in plan.views:
        add(f"fp16 K={k}", "fp16", os.path.join(out, f"run-fp16-k{k}"), store=stores[k])
    for method in plan.methods:
        for fraction in plan.fractions:
            q = _quantized(plan, out, stores[plan.quantized_views], method, fraction, progress)
            add(f"{method} 1/{fraction} K={plan.quantized_views}", "quantized", os.path.join(out, f"run-{method}-1of{fraction}"),
                store=q)
    if plan.predict_codes and plan.methods and plan.fractions:
        method, fraction = plan.methods[0], max(plan.fractions)
        q = _quantized(plan, out, stores[plan.quantized_views], method, fraction, progress)
        add(f"{method} 1/{fraction} K={plan.quantized_views}, --predict-codes", "codes",
            os.path.join(out, f"run-{method}-1of{fraction}-codes"), store=q, predict_codes=True)
    steps = same_steps(rows)
    random_init = probe_model("model", plan.corpus, ProbeOptions(seed=plan.seed), model=plan.student)
    teacher_knn = probe_store(stores[plan.views[0]], plan.corpus, ProbeOptions(seed=plan.seed))
    online = rows[0]
    fp16 = {r["store"]: r for r in rows if r["kind"] == "fp16"}
    for r in rows:
        r["vs_online"] = r["top1"] / online["top1"] if online["top1"] else None
        base = fp16.get(stores[plan.quantized_views]) if r["kind"] in ("quantized", "codes") else None
        r["vs_fp16_same_k"] = r["top1"] / base["top1"] if base and base["top1"] else None
        r["online_fit_over_this"] = online["fit_seconds"] / r["fit_seconds"]
    result = {"plan": asdict(plan), "environment": environment(), "steps": steps, "rows": rows,
              "random_init": {"top1": random_init["top1"], "top5": random_init["top5"]},
              "teacher": {"top1": teacher_knn["top1"], "top5": teacher_knn["top5"]},
              "extract_seconds": extract_seconds, "protocol": knn_protocol(random_init)}
    return write_study(out, "quality", result, format_quality(result))


def format_quality(r: dict) -> str:
    p, pr = r["plan"], r["protocol"]
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# quality: {p['student']} from {p['teacher'].split(',')[0]}, {r['steps']} steps each "
             f"({p['epochs']} epochs of batch {p['batch_size']})",
             f"kNN k={pr['k']}, T={pr['temperature']}, {pr['n_train']} train / {pr['n_val']} val samples, "
             f"{pr['classes']} classes, split seed {pr['split_seed']}", "",
             "| variant | KiB/view stored | fit s | online fit s / this | kNN top-1 | top-5 | vs online | vs fp16 same K |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        kib = None if row["bytes_per_view"] is None else row["bytes_per_view"] / 1024
        lines.append(f"| {row['variant']} | {f(kib, 1)} | {row['fit_seconds']:.1f} | {row['online_fit_over_this']:.2f} | "
                     f"{row['top1']:.3f} | {row['top5']:.3f} | {f(row['vs_online'])} | {f(row['vs_fp16_same_k'])} |")
    lines += [f"| random-init student | - | - | - | {r['random_init']['top1']:.3f} | {r['random_init']['top5']:.3f} | - | - |",
              f"| teacher, cached features | - | - | - | {r['teacher']['top1']:.3f} | {r['teacher']['top5']:.3f} | - | - |",
              "", "extraction (teacher paid once): " + ", ".join(f"K={k}: {s:.0f} s" for k, s in r["extract_seconds"].items())]
    return "\n".join(lines)
