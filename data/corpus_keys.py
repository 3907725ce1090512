"""``kdcache verify STORE --data DATA``: the store's own checks plus its corpus, through the one walk.

The corpus is re-read with the options recorded in the store (``ReadOptions``), and each
shard's expected samples come from ``walk.stored_samples``, the same function extraction and
training use, lazily, one shard at a time: each sample's key, and the CRC-32 of its image bytes
(what the store's ``origin`` recorded at extraction: an image replaced under the same name, or
damaged since, differs).
"""
from __future__ import annotations

from typing import Iterator

from kdcache.store import Store, StoreError
from kdcache.store.checks import bytes_crc32
from kdcache.store.verify import VerifyReport, verify

from .corpus import Corpus, CorpusShard, ReadOptions, resolve_corpus
from .walk import stored_samples


def corpus_keys(store: Store, corpus: Corpus) -> dict[str, Iterator[tuple[str, int]]]:
    """Corpus shard name -> the (key, CRC-32 of its image bytes) of every sample its store shard
    should hold (lazy)."""
    return {shard.name: _expected_samples(store, corpus, shard) for shard in corpus.shards}


def _expected_samples(store: Store, corpus: Corpus, shard: CorpusShard) -> Iterator[tuple[str, int]]:
    try:
        failed = (store.shard_attrs(shard.name) or {}).get("failed", [])
    except StoreError:  # the store side reports the shard's metadata; its keys cannot be compared
        return
    for s in stored_samples(corpus, shard, failed):
        yield s.key, (bytes_crc32(s.data) if s.data is not None else -1)


def verify_with_corpus(url: str, data: str, *, progress: bool = False, metadata_only: bool = False,
                       pin: str | None = None) -> VerifyReport:
    """Verify ``url`` and that it matches corpus ``data``, reading only: verify never writes."""
    store = Store.open(url, index=False)
    return verify(store, corpus_keys(store, resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus))),
                  progress=progress, data=not metadata_only, pin=pin)
