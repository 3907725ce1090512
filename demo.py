"""``kdcache demo``: the main job on the embedded corpus (see extract/demo_corpus.py)."""
from __future__ import annotations

import os

from kdcache.extract import ExtractOptions, extract
from kdcache.extract.demo_corpus import build_demo_corpus
from kdcache.store import Store
from kdcache.store.inspect import format_info, info


def run_demo(out: str, *, teacher: str, views: int = 2) -> str:
    corpus = os.path.join(out, "corpus")
    store = os.path.join(out, "store.zarr")
    build_demo_corpus(corpus)
    summary = extract(corpus, store, [teacher], ExtractOptions(views=views, batch_size=32, workers=1))
    return f"{summary.line()}\n\n{format_info(info(Store.open(store)))}\n\nstore: {store}"
