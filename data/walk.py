"""The one walk over a corpus shard: which samples it holds, and which store row each one is.

Every reader of a corpus (extraction, ``verify --data``, training, evaluation) goes through
here, so they can never disagree about which samples exist:

``shard_samples`` reads a shard's raw samples in order: a tar's members (webdataset's tar
iterator) grouped by key, or an image folder's files. webdataset's own ``group_by_keys`` drops
members whose name has no key (``...jpg``) without a word; here such a member, and one repeating
a field of its sample, becomes a sample with an error, because kdcache records every sample it
does not store.

``screen`` applies the key rules (``corpus.KEY_RULES``), in order: a tar that breaks off ends
the shard (``(tar)``); a sample that cannot be used at all, a key that is empty, has a ``.`` or
``..`` path segment, a leading ``/`` or control characters, and the second and later samples of
a key, are ``Skip``s. These rules depend on the bytes of the shard alone, so every reader
re-derives them identically.

``align`` walks the screened samples of a shard in step with the store shard's keys: a sample
whose key was recorded as failed at extraction (it did not decode) is passed over; every other
one must be the next stored key, and carries its store ``row``. Any disagreement is an
``AlignError`` naming shard, row and key.

Error policy (webdataset's ``handler=`` idea): what happens to a ``Skip`` is a function the
caller passes in (``screened``, ``data.pixels.view_pixels``). The handlers are here:
``record_to`` keeps it, ``fail_on_skip`` raises it naming the shard and key, ``skip_handler``
picks one of those for ``--on-error``, ``changed_since_extraction`` refuses a stored sample
that no longer decodes, ``counted_before`` passes over what an earlier pass already recorded.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from kdcache.errors import KdcacheError

from .corpus import IMAGE_EXTS, Corpus, CorpusShard

TAR_KEY = "(tar)"  # the key a broken-off tar is recorded under
DUPLICATE = "duplicate key in shard"
MAX_KEY_BYTES = 1024
ON_ERROR = ("skip", "fail")


class AlignError(KdcacheError):
    """A corpus shard does not match its store shard (another corpus, or a changed one)."""


class BadSample(KdcacheError):
    """A sample skipped under ``on_error=fail``."""


@dataclass(frozen=True)
class RawSample:
    """One sample of a shard, as read: its key, its image bytes, its label (webdataset ``cls``,
    image-folder class), and, once aligned with a store shard, its ``row`` there."""

    key: str
    data: bytes | None  # None when the sample has no image field (or its bytes were not read: ``read_data``)
    label: int | None
    fields: tuple[str, ...] = ()
    error: str | None = None  # why the sample cannot be used at all (unreadable file, member without a key)
    row: int | None = None  # its row in the store shard (``align``)
    offset: int = -1  # where its image bytes start in the shard's file (a tar member's data; 0 for a folder's file)
    size: int = 0  # how many bytes they are


@dataclass(frozen=True)
class ShardReadError:
    """Yielded in place of samples when a tar shard breaks off (truncated or corrupt tar)."""

    error: str


@dataclass(frozen=True)
class Skip:
    """A sample that is not stored, and why (what goes into the shard's ``failed`` list)."""

    key: str
    error: str

    def record(self) -> dict:
        return {"key": self.key, "error": self.error}


# -- reading a shard -----------------------------------------------------------------------

def shard_samples(corpus: Corpus, shard: CorpusShard, *, read_data: bool = True) -> Iterator[RawSample | ShardReadError]:
    """The shard's raw samples in corpus order (no key rules applied yet: ``screen``), each with
    where its image bytes are (``offset``, ``size``). ``read_data`` off: the image bytes are not
    read (a local tar's headers alone, seeking over the data: what a reader that only needs the
    samples' places pays); labels are read either way."""
    if corpus.kind == "folder":
        yield from _folder_samples(corpus, shard, read_data=read_data)
    else:
        yield from _tar_samples(shard.url, read_data=read_data)


def folder_label(corpus: Corpus, rel: str) -> int | None:
    """An image folder's label of a file: the index of its top-level class folder, or None."""
    top = rel.split("/", 1)[0] if "/" in rel else None
    return corpus.classes.index(top) if top in corpus.classes else None


def _folder_samples(corpus: Corpus, shard: CorpusShard, *, read_data: bool = True) -> Iterator[RawSample]:
    for rel in shard.members:
        key = os.path.splitext(rel)[0]
        label = folder_label(corpus, rel)
        path = os.path.join(shard.url, rel)
        try:
            if read_data:
                with open(path, "rb") as f:
                    data = f.read()
                size = len(data)
            else:
                data, size = None, os.stat(path).st_size
        except OSError as e:
            yield RawSample(key, None, label, error=f"unreadable file: {e.strerror}")
            continue
        yield RawSample(key, data, label, (os.path.splitext(rel)[1][1:].lower(),), offset=0, size=size)


COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd: offsets are not the file's


def _tar_samples(url: str, *, read_data: bool = True) -> Iterator[RawSample | ShardReadError]:
    import fsspec
    from webdataset.tariterators import base_plus_ext
    try:
        with fsspec.open(url, "rb") as stream:
            yield from _group_members(tar_members(stream, read_data=read_data), base_plus_ext)
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors...: the rest is lost
        yield ShardReadError(f"{url}: tar read error: {type(e).__name__}: {e.args[0] if e.args else e}")


_META = re.compile(r"__[^/]*__($|/)")


def tar_members(stream, *, read_data: bool = True) -> Iterator[dict]:
    """A tar's regular members as webdataset's ``tar_file_iterator`` yields them ({fname, data},
    its ``__meta__`` members skipped alike), plus where each member's data lies in the file
    (``offset``, ``size``; offset -1 in a compressed tar, whose offsets are not the file's).
    Written here because webdataset's iterator does not say where a member is, and a loader
    that reads any sample of a shard needs exactly that. ``read_data`` off: the data is not
    read (``data`` None; labels and other small fields still are), and a seekable file is walked
    header by header."""
    import tarfile
    head = stream.read(6)
    stream.seek(0)
    compressed = any(head.startswith(m) for m in COMPRESSED)
    seekable = not read_data and not compressed and getattr(stream, "seekable", lambda: False)()
    tar = tarfile.open(fileobj=stream, mode="r:" if seekable else "r|*")
    for info in tar:
        name = info.name
        if not info.isreg() or name is None or _META.match(name) or (
                "/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        image = name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS
        data = tar.extractfile(info).read() if read_data or not image else None  # (labels are read either way)
        yield {"fname": name, "data": data, "offset": -1 if compressed else info.offset_data, "size": info.size}
        tar.members = []  # (webdataset's way: a stream's member list would grow with the shard)


def _group_members(members, base_plus_ext) -> Iterator[RawSample]:
    """Consecutive members with the same key form a sample (webdataset's convention: the key is
    the name up to the first dot of its last path component). A member whose name has no key,
    or that repeats a field of its sample, becomes a recorded bad sample instead of vanishing."""
    current: dict | None = None
    for m in members:
        name, data = m["fname"], m["data"]
        key, ext = base_plus_ext(name)
        if key is None:
            if current is not None:
                yield _raw_sample(current)
                current = None
            yield RawSample(name.rsplit(".", 1)[0] or name, None, None, error=f"tar member {name!r} has no sample key")
            continue
        ext = ext.lower()
        if current is not None and key == current["__key__"] and ext in current:
            current["__error__"] = f"tar member {name!r} repeats field {ext!r} of its sample"
            continue
        if current is None or key != current["__key__"]:
            if current is not None:
                yield _raw_sample(current)
            current = {"__key__": key, "__places__": {}}
        current[ext] = data
        current["__places__"][ext] = (m.get("offset", -1), m.get("size", 0))
    if current is not None:
        yield _raw_sample(current)


def _raw_sample(s: dict) -> RawSample:
    fields = tuple(k for k in s if not k.startswith("__"))
    image = next((e for e in IMAGE_EXTS if e in s), None)
    label = None
    for f in ("cls", "label"):
        if f in s:
            try:
                label = int(s[f].decode().strip()) if s[f] is not None else None
            except (ValueError, UnicodeDecodeError):
                pass
            break
    offset, size = s["__places__"].get(image, (-1, 0))
    return RawSample(s["__key__"], None if image is None else s[image], label, fields, error=s.get("__error__"),
                     offset=offset, size=size)


# -- the key rules -------------------------------------------------------------------------

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


def screened(corpus: Corpus, shard: CorpusShard, handler: Callable[[Skip], None]) -> Iterator[RawSample]:
    """The usable samples of a shard, in order; each Skip goes to ``handler``."""
    for s in screen(shard_samples(corpus, shard)):
        if isinstance(s, Skip):
            handler(s)
        else:
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
    for s in screen(shard_samples(corpus, shard)):
        if not isinstance(s, Skip) and s.key not in skip:
            yield s


def align(corpus: Corpus, shard: CorpusShard, stored_keys: list[str], failed: Iterable[dict]) -> Iterator[RawSample]:
    """Every stored sample of ``shard`` in order, with its ``row``; AlignError on any mismatch."""
    row = 0
    for s in stored_samples(corpus, shard, failed):
        if row >= len(stored_keys) or s.key != stored_keys[row]:
            want = stored_keys[row] if row < len(stored_keys) else "(end of store shard)"
            raise AlignError(f"shard {shard.name}: corpus key {s.key!r} where the store has {want!r} at row {row}: "
                             f"the store was not extracted from this corpus")
        yield RawSample(s.key, s.data, s.label, s.fields, s.error, row, s.offset, s.size)  # (dataclasses.replace: 4x the time)
        row += 1
    if row != len(stored_keys):
        raise AlignError(f"shard {shard.name}: the corpus ended after {row} samples, the store has {len(stored_keys)}")


# -- what happens to a skipped sample --------------------------------------------------------

def record_to(records: list) -> Callable[[Skip], None]:
    """Keep each Skip's record ({key, error}) in ``records`` and go on."""
    return lambda skip: records.append(skip.record())


def fail_on_skip(shard: CorpusShard) -> Callable[[Skip], None]:
    def handle(skip: Skip) -> None:
        raise BadSample(f"{shard.url}: sample {skip.key!r}: {skip.error} (--on-error fail)")
    return handle


def skip_handler(on_error: str, shard: CorpusShard, record: Callable[[Skip], None]) -> Callable[[Skip], None]:
    """``--on-error`` as a handler: ``skip`` records (``record``), ``fail`` raises naming shard and key."""
    if on_error not in ON_ERROR:
        raise KdcacheError(f"--on-error {on_error!r}: expected one of {', '.join(ON_ERROR)}")
    return record if on_error == "skip" else fail_on_skip(shard)


def changed_since_extraction(shard: CorpusShard) -> Callable[[Skip], None]:
    """For samples a store holds: they decoded at extraction, so one that no longer does means the
    corpus changed under the store."""
    def handle(skip: Skip) -> None:
        raise AlignError(f"shard {shard.name}: sample {skip.key!r} was extracted but now fails to decode: {skip.error}")
    return handle


def counted_before(skip: Skip) -> None:
    """Pass over a sample an earlier pass already counted out and recorded (``train --online``
    counts and records the samples of every shard before training)."""


def label_classes(corpus: Corpus) -> int:
    """Classes of a labelled corpus: an image folder's class count, else the largest label + 1
    over the screened samples (one pass over the corpus); 0 when it has no labels."""
    if corpus.kind == "folder":
        return len(corpus.classes)
    top = -1
    for shard in corpus.shards:
        for s in screen(shard_samples(corpus, shard)):
            if not isinstance(s, Skip) and s.label is not None:
                top = max(top, int(s.label))
    return top + 1
