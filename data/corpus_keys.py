"""``kdcache verify STORE --data DATA``: the store's own checks plus its corpus, through the one walk.

The corpus is re-read with the options recorded in the store (``ReadOptions``), and each
shard's expected keys come from ``walk.stored_samples``, the same function extraction and
training use, lazily, one shard at a time.
"""
from __future__ import annotations

from typing import Iterator

from kdcache.store import Store
from kdcache.store.verify import VerifyReport, verify

from .corpus import Corpus, CorpusShard, ReadOptions, resolve_corpus
from .walk import stored_samples


def corpus_keys(store: Store, corpus: Corpus) -> dict[str, Iterator[str]]:
    """Corpus shard name -> the keys its store shard should hold (lazy)."""
    return {shard.name: _expected_keys(store, corpus, shard) for shard in corpus.shards}


def _expected_keys(store: Store, corpus: Corpus, shard: CorpusShard) -> Iterator[str]:
    failed = (store.shard_attrs(shard.name) or {}).get("failed", [])
    for s in stored_samples(corpus, shard, failed):
        yield s.key


def verify_with_corpus(url: str, data: str, *, progress: bool = False, metadata_only: bool = False) -> VerifyReport:
    """Verify ``url`` and that it matches corpus ``data``, reading only: verify never writes."""
    store = Store.open(url, index=False)
    return verify(store, corpus_keys(store, resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus))),
                  progress=progress, data=not metadata_only)
