"""``kdcache verify``: every complete shard against its digest, and optionally the corpus."""
from __future__ import annotations

from kdcache.store import Store
from kdcache.store.inspect import scan, verify_shard, write_summary

from .corpus import ShardReadError, resolve_corpus


def verify(url: str, data: str | None = None, *, update_summary: bool = True) -> tuple[list[str], dict]:
    """Returns (problems, counts). With ``data``, stored keys must equal the corpus keys in order
    (minus the samples recorded as failed) and every corpus shard must be in the store."""
    store = Store.open(url, writable=update_summary)
    s = scan(store)
    problems = [p for name in s["complete"] for p in verify_shard(store, name)]
    if data is not None:
        corpus = resolve_corpus(data)
        names = {sh.name for sh in corpus.shards}
        problems += [f"shard {n}: in the store but not in corpus {data}" for n in s["complete"] if n not in names]
        for shard in corpus.shards:
            if shard.name not in s["complete"]:
                problems.append(f"shard {shard.name}: in the corpus but not complete in the store")
                continue
            problems += _keys_problems(store, corpus, shard)
    if update_summary:
        write_summary(store)
    return problems, {"shards_checked": len(s["complete"]), "shards_incomplete": len(s["incomplete"]),
                      "samples": s["samples"]}


def _keys_problems(store, corpus, shard) -> list[str]:
    attrs = store.shard_attrs(shard.name)
    failed = {f["key"] for f in attrs.get("failed", [])}
    stored = store.keys(shard.name).tolist()
    corpus_keys = []
    for s in corpus.samples(shard):
        if isinstance(s, ShardReadError):
            if "(tar)" not in failed:
                return [f"shard {shard.name}: {s.error}"]
            break
        if s.key not in failed:
            corpus_keys.append(s.key)
    if corpus_keys == stored:
        return []
    for i, (a, b) in enumerate(zip(stored, corpus_keys)):
        if a != b:
            return [f"shard {shard.name}: key {i} is {a!r} in the store but {b!r} in the corpus"]
    return [f"shard {shard.name}: {len(stored)} keys in the store, {len(corpus_keys)} in the corpus"]
