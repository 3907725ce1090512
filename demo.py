"""``kdcache demo``: the main job, end to end, on the embedded corpus (data/demo_corpus.py).

Builds the corpus from real images shipped in scikit-learn, extracts a small timm teacher with
K views, trains a small student from the store for a short budget, prints the store report
and where the run directory and loss plot are.
"""
from __future__ import annotations

import json
import os

from kdcache.extract import ExtractOptions, extract
from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.store import Store
from kdcache.store.inspect import format_info, info
from kdcache.train.config import TrainConfig
from kdcache.train.loop import train


def run_demo(out: str, *, teacher: str, student: str, views: int = 2, epochs: int = 3) -> str:
    corpus = os.path.join(out, "corpus")
    store = os.path.join(out, "store.zarr")
    run = os.path.join(out, "run")
    build_demo_corpus(corpus)
    summary = extract(corpus, store, [teacher], ExtractOptions(views=views, batch_size=32, workers=1))
    result = train(TrainConfig(store=store, data=corpus, student=student, out=run, epochs=epochs, batch_size=32,
                               workers=1, lr=2e-3, warmup_steps=4, head_hidden=256, log_every=1, overwrite=True))
    return "\n\n".join([summary.line(), format_info(info(Store.open(store))), json.dumps(result, indent=2),
                        f"store: {store}\nrun:   {run}\nloss plot: {result['loss_plot']}"])
