"""The one walk over a corpus shard: which samples exist, and which store row each one is.

Every reader of a corpus (extraction, ``verify --data``, training) goes through here, so they
can never disagree about which samples exist:

``screen`` applies the key rules (``corpus.KEY_RULES``) to the raw samples of a shard, in
order: a tar that breaks off ends the shard (``(tar)``); a sample that cannot be used at all,
a key that is empty, has a ``.`` or ``..`` path segment, a leading ``/`` or control characters,
and the second and later samples of a key, are ``Skip``s. These rules depend on the bytes of
the tar alone, so every reader re-derives them identically.

``align`` walks the screened samples of a shard in step with the store shard's keys: a sample
whose key was recorded as failed at extraction (it did not decode) is passed over; every other
one must be the next stored key. Any disagreement is an ``AlignError`` naming shard, row and key.

Error policy (webdataset's ``handler=`` idea): the caller passes ``on_skip``; ``record`` keeps
the skip, ``fail`` raises it as an error naming the shard and key.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from kdcache.store import KdcacheError

from .corpus import Corpus, CorpusShard, RawSample, ShardReadError

TAR_KEY = "(tar)"  # the key a broken-off tar is recorded under
DUPLICATE = "duplicate key in shard"
MAX_KEY_BYTES = 1024


class AlignError(KdcacheError):
    """A corpus shard does not match its store shard (another corpus, or a changed one)."""


class BadSample(KdcacheError):
    """A sample skipped under ``on_error=fail``."""


@dataclass(frozen=True)
class Skip:
    """A sample that is not stored, and why (what goes into the shard's ``failed`` list)."""

    key: str
    error: str

    def record(self) -> dict:
        return {"key": self.key, "error": self.error}


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key, or None when it can."""
    if not key:
        return "empty sample key"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"sample key longer than {MAX_KEY_BYTES} bytes"
    if any(unicodedata.category(c) == "Cc" for c in key):
        return "sample key with control characters"
    if key.startswith("/") or any(part in (".", "..") for part in key.split("/")):
        return "sample key with a '.', '..' or leading '/' path segment"
    return None


def screen(samples: Iterable[RawSample | ShardReadError]) -> Iterator[RawSample | Skip]:
    """Raw samples of one shard -> usable samples and Skips, in corpus order (see module doc)."""
    seen: set[str] = set()
    for s in samples:
        if isinstance(s, ShardReadError):
            yield Skip(TAR_KEY, s.error)
            return
        problem = s.error or key_problem(s.key)
        if problem:
            yield Skip(s.key, problem)
        elif s.key in seen:
            yield Skip(s.key, DUPLICATE)
        else:
            seen.add(s.key)
            yield s


def decode_failures(failed: Iterable[dict]) -> set[str]:
    """Keys recorded as failed *after* screening (they did not decode): the ones ``align`` skips.
    Failures that ``screen`` re-derives by itself (tar, key rules, duplicates) are not needed."""
    out = set()
    for f in failed:
        key, error = f.get("key"), f.get("error", "")
        if key == TAR_KEY or error == DUPLICATE or key_problem(key or "") is not None:
            continue
        out.add(key)
    return out


def stored_samples(corpus: Corpus, shard: CorpusShard, failed: Iterable[dict]) -> Iterator[RawSample]:
    """The samples of ``shard`` that its store shard holds, in order: screened, minus the keys
    recorded as failed to decode. Extraction stored exactly these."""
    skip = decode_failures(failed)
    for s in screen(corpus.samples(shard)):
        if not isinstance(s, Skip) and s.key not in skip:
            yield s


def align(corpus: Corpus, shard: CorpusShard, stored_keys: list[str], failed: Iterable[dict]) -> Iterator[tuple[int, RawSample]]:
    """(row, sample) for every stored row of ``shard``, in order; AlignError on any mismatch."""
    row = 0
    for s in stored_samples(corpus, shard, failed):
        if row >= len(stored_keys) or s.key != stored_keys[row]:
            want = stored_keys[row] if row < len(stored_keys) else "(end of store shard)"
            raise AlignError(f"shard {shard.name}: corpus key {s.key!r} where the store has {want!r} at row {row}: "
                             f"the store was not extracted from this corpus")
        yield row, s
        row += 1
    if row != len(stored_keys):
        raise AlignError(f"shard {shard.name}: the corpus ended after {row} samples, the store has {len(stored_keys)}")


ON_ERROR = ("skip", "fail")


def skip_handler(on_error: str, shard: CorpusShard, record: Callable[[Skip], None]) -> Callable[[Skip], None]:
    """The error policy as a function: ``skip`` records, ``fail`` raises naming shard and key."""
    if on_error not in ON_ERROR:
        raise KdcacheError(f"--on-error {on_error!r}: expected one of {', '.join(ON_ERROR)}")

    def handle(skip: Skip) -> None:
        if on_error == "fail":
            raise BadSample(f"{shard.url}: sample {skip.key!r}: {skip.error} (--on-error fail)")
        record(skip)
    return handle


def label_classes(corpus: Corpus) -> int:
    """Classes of a labelled corpus: an image folder's class count, else the largest label + 1
    over the screened samples (one pass over the corpus); 0 when it has no labels."""
    if corpus.kind == "folder":
        return len(corpus.classes)
    top = -1
    for shard in corpus.shards:
        for s in screen(corpus.samples(shard)):
            if not isinstance(s, Skip) and s.label is not None:
                top = max(top, int(s.label))
    return top + 1
