"""``kdcache verify``: every complete shard against its digests and shapes, optionally the corpus.

The one place a store is verified. The corpus side comes in as plain iterables of keys (what
each corpus shard should hold, computed by ``kdcache.data.corpus_keys`` through the one walk),
so ``store/`` stays free of corpus code, and verifying the store alone imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from kdcache.errors import StoreError, one_line

from .layout import digest_array
from .meta import has_teacher, teacher_arrays
from .shard_index import INDEX_KEY, agrees
from .store import Store


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    shards_incomplete: int = 0
    samples: int = 0

    def line(self) -> str:
        return (f"checked {self.shards_checked} complete shard(s), {self.samples} samples; "
                f"{self.shards_incomplete} incomplete; {len(self.problems)} problem(s)")

    def to_dict(self) -> dict:
        return {"problems": self.problems, "shards_checked": self.shards_checked,
                "shards_incomplete": self.shards_incomplete, "samples": self.samples}


def verify(store: Store, corpus_keys: Mapping[str, Iterable[str]] | None = None, *, progress: bool = False,
           data: bool = True) -> VerifyReport:
    """Digests, shapes and counts of every complete shard (``data`` off: metadata and shapes
    only, no array read); the shard index against the shards; with ``corpus_keys`` (corpus shard
    name -> the keys it should hold, lazily), that the stored keys equal them in order and that
    the store and the corpus hold the same shards."""
    from tqdm import tqdm
    complete = store.complete_shards()
    report = VerifyReport(shards_checked=len(complete), shards_incomplete=len(store.shard_names()) - len(complete))
    for name in tqdm(complete, unit="shard", desc="verify digests" if data else "verify metadata", disable=not progress,
                     dynamic_ncols=True):
        report.samples += int((store.shard_attrs(name) or {}).get("count", 0))
        report.problems += verify_shard(store, name, data=data)
    report.problems += index_problems(store, complete)
    if corpus_keys is not None:
        report.problems += [f"shard {n}: in the store but not in the corpus" for n in complete if n not in corpus_keys]
        for name, keys in tqdm(corpus_keys.items(), unit="shard", desc="verify keys against the corpus",
                               disable=not progress, dynamic_ncols=True):
            if name not in complete:
                report.problems.append(f"shard {name}: in the corpus but not complete in the store")
            else:
                report.problems += _keys_problems(store, name, keys)
    return report


def verify_store(url: str, corpus_keys: Mapping[str, Iterable[str]] | None = None, *, progress: bool = False,
                 data: bool = True) -> VerifyReport:
    """``kdcache verify URL``: open the store read-only and verify it (verify never writes; it
    reads every shard's own metadata, never the shard index's word for it)."""
    return verify(Store.open(url, index=False), corpus_keys, progress=progress, data=data)


def index_problems(store: Store, complete: list[str]) -> list[str]:
    """The shard index against the shards: an index that does not parse, or an entry that says
    other than its shard (stale or tampered: readers would warn and read the shard). A complete
    shard the index lacks is no problem (readers ask it themselves)."""
    import logging
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            problems.append(f"{INDEX_KEY}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("kdcache.store")
    logger.addHandler(handler)
    try:
        entries = store.stored_index()
    finally:
        logger.removeHandler(handler)
    if entries is None:
        return problems
    done = set(complete)
    for name, entry in sorted(entries.items()):
        if name not in done and name not in store.shard_names():
            continue  # a shard deleted since: readers never see it (the listing decides)
        if not agrees(entry, store.shard_attrs(name)):
            problems.append(f"{INDEX_KEY}: the entry for shard {name} disagrees with the shard's own metadata (stale or "
                            f"tampered; readers ignore it with a warning; kdcache store stats rewrites the index)")
    return problems


def _keys_problems(store: Store, name: str, corpus_keys: Iterable[str]) -> list[str]:
    try:
        stored = store.keys(name).tolist()
    except StoreError as e:  # a damaged keys array is a finding, found once by verify_shard too
        return [f"shard {name}: keys unreadable, the corpus cannot be compared ({one_line(e)})"]
    i = 0
    try:
        for key in corpus_keys:
            if i >= len(stored):
                return [f"shard {name}: {len(stored)} keys in the store, the corpus has more (next {key!r})"]
            if key != stored[i]:
                return [f"shard {name}: key {i} is {stored[i]!r} in the store but {key!r} in the corpus"]
            i += 1
    except Exception as e:  # noqa: BLE001 - an unreadable corpus shard is a finding, not a crash
        return [f"shard {name}: corpus unreadable after {i} keys: {e}"]
    if i != len(stored):
        return [f"shard {name}: {len(stored)} keys in the store, {i} in the corpus"]
    return []


def verify_shard(store: Store, name: str, *, data: bool = True) -> list[str]:
    """Problems found in one complete shard (empty when intact); ``data`` off: shapes only."""
    where = f"shard {name}"
    attrs = store.shard_attrs(name) or {}
    digest, count, k = attrs.get("digest", {}), attrs.get("count"), store.meta.views
    problems = []
    expected = {"keys": (count,), "views": (count, k, 5)}
    for t, m in store.meta.teachers.items():
        if not has_teacher(digest, t):
            problems.append(f"{where}: teacher {t} missing (no digest entry)")
            continue
        expected.update({p: (count, *shape) for p, (shape, _, _) in teacher_arrays(t, m, k).items() if p in digest})
    expected.update({p: None for p in digest if p not in expected})
    for path, shape in expected.items():
        try:
            arr = store.array(name, path)
        except Exception as e:  # noqa: BLE001 - any read failure is a finding
            problems.append(f"{where}: {path}: unreadable ({e})")
            continue
        if shape is not None and tuple(arr.shape) != shape:
            problems.append(f"{where}: {path}: shape {tuple(arr.shape)}, expected {shape}")
            continue
        if not data:
            continue
        try:
            got = digest_array(arr)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where}: {path}: cannot read data ({type(e).__name__}: {e})")
            continue
        if got != digest.get(path):
            problems.append(f"{where}: {path}: digest mismatch (stored {str(digest.get(path))[:12]}, data {got[:12]})")
    return problems
