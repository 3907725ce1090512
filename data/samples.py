"""Any stored sample of a corpus shard, by row: where its image bytes are, and reading them.

A loader that splits an epoch by sample (``data.partition``) reads the rows of a block of any
shard, not whole shards from their start. ``ShardPlaces`` says, for every stored row of a shard,
its key, its label and where its image bytes lie: a byte range of the tar (the image member's
data), or a file of an image folder. ``read_rows`` then reads any rows with one ranged read per
run of nearby rows (the rows of one block sit together in a tar: one request per block on object
storage), and checks each image against the CRC-32 extraction recorded.

Where the places come from:

- the store's ``origin`` rows (store format 3: offset, length, CRC-32, label per sample), with its
  keys: no corpus read at all before the images themselves;
- a store written before: the corpus shard's own walk aligned with the stored keys
  (``data.walk.align``), reading a local tar's headers only (seeking over the images) or a
  remote tar once, kept per process;
- no store (online distillation, evaluation): the walk of the samples that decode.

A compressed tar (its offsets are not the file's) is read by walking it to the rows asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from kdcache.store.reads import bytes_crc32
from kdcache.store.remote import is_url

from .corpus import Corpus, CorpusShard
from .walk import AlignError, RawSample, Skip, align

GAP = 1 << 20  # rows whose bytes are at most this far apart are read in one request (tar headers, label members)


class CorpusChanged(AlignError):
    """A sample's image bytes are not those extracted (the corpus changed under the store)."""


@dataclass(frozen=True)
class ShardPlaces:
    """Every stored row of one corpus shard: key, label (-1: none), and where its image bytes are
    (``offsets``/``sizes`` in the tar, -1 when unknown; an image folder's ``files``), with the
    CRC-32 of those bytes when the store recorded it (-1: not recorded)."""

    shard: str
    keys: tuple[str, ...]
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    crcs: np.ndarray
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows) -> "ShardPlaces":
        """These rows only (in this order): e.g. the labelled samples an evaluation scores."""
        rows = np.asarray(list(rows), dtype=np.int64)
        return ShardPlaces(self.shard, tuple(self.keys[r] for r in rows), self.labels[rows], self.offsets[rows],
                           self.sizes[rows], self.crcs[rows], tuple(self.files[r] for r in rows) if self.files else ())

    @classmethod
    def from_samples(cls, shard: str, samples: Iterable[RawSample], *, files: tuple[str, ...] = (),
                     crc: bool = True) -> "ShardPlaces":
        """From samples read in row order; ``crc``: the CRC-32 of the bytes they were read with, so
        a later read of different bytes is caught (none for samples read without their bytes)."""
        rows = list(samples)
        return cls(shard, tuple(s.key for s in rows), np.array([-1 if s.label is None else s.label for s in rows], np.int64),
                   np.array([s.offset for s in rows], np.int64), np.array([s.size for s in rows], np.int64),
                   np.array([bytes_crc32(s.data) if crc and s.data is not None else -1 for s in rows], np.int64), files)

    @classmethod
    def from_origin(cls, shard: str, keys, origin: np.ndarray, *, files: tuple[str, ...] = ()) -> "ShardPlaces":
        return cls(shard, tuple(keys), origin[:, 3].copy(), origin[:, 0].copy(), origin[:, 1].copy(), origin[:, 2].copy(),
                   files)


def folder_files(shard: CorpusShard, keys) -> tuple[str, ...]:
    """An image folder's file per key (the first file of that stem: the walk's rule for duplicates)."""
    first: dict[str, str] = {}
    for rel in shard.members:
        first.setdefault(os.path.splitext(rel)[0], rel)
    return tuple(first.get(k, "") for k in keys)


def walked_places(corpus: Corpus, shard: CorpusShard, keys, failed) -> ShardPlaces:
    """The places of a store shard's rows from the corpus's own walk (a store without ``origin``):
    aligned with the stored keys (``AlignError`` on any difference); a local tar's headers only."""
    from .walk import folder_label, shard_samples
    if corpus.kind == "folder":  # a key names its file: nothing to read
        files = folder_files(shard, keys)
        labels = [folder_label(corpus, f) if f else None for f in files]
        return folder_places(shard.name, keys, labels, files)
    if not is_url(shard.url):  # a local tar's headers only, seeking over the images
        samples = _align_keys(shard, _stored(shard_samples(corpus, shard, read_data=False), failed), list(keys))
    else:
        samples = align(corpus, shard, list(keys), failed)
    return ShardPlaces.from_samples(shard.name, samples, crc=False)


def folder_places(shard: str, keys, labels, files) -> ShardPlaces:
    """An image folder's places: one file per row, no offsets (a row is its whole file)."""
    n = len(files)
    return ShardPlaces(shard, tuple(keys), np.array([-1 if x is None else x for x in labels], np.int64),
                       np.zeros(n, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64), tuple(files))


def _stored(samples, failed):
    from .walk import decode_failures, screen
    skip = decode_failures(failed)
    for s in screen(samples):
        if not isinstance(s, Skip) and s.key not in skip:
            yield s


def _align_keys(shard: CorpusShard, samples, keys: list[str]) -> Iterator[RawSample]:
    row = 0
    for s in samples:
        if row >= len(keys) or s.key != keys[row]:
            want = keys[row] if row < len(keys) else "(end of store shard)"
            raise AlignError(f"shard {shard.name}: corpus key {s.key!r} where the store has {want!r} at row {row}: "
                             f"the store was not extracted from this corpus")
        yield RawSample(s.key, None, s.label, s.fields, s.error, row, s.offset, s.size)
        row += 1
    if row != len(keys):
        raise AlignError(f"shard {shard.name}: the corpus ended after {row} samples, the store has {len(keys)}")


def corpus_places(corpus: Corpus) -> dict[str, ShardPlaces]:
    """Every corpus shard's screened samples and their places, from its walk (a local tar's headers
    only): what a reader of the corpus alone needs to read any of them (no decode is tried)."""
    from .walk import shard_samples, screen
    out = {}
    for shard in corpus.shards:
        if corpus.kind == "folder":
            good = [s for s in screen(shard_samples(corpus, shard, read_data=False)) if not isinstance(s, Skip)]
            out[shard.name] = folder_places(shard.name, [s.key for s in good], [s.label for s in good],
                                            folder_files(shard, [s.key for s in good]))
        else:
            good = (s for s in screen(shard_samples(corpus, shard, read_data=is_url(shard.url))) if not isinstance(s, Skip))
            out[shard.name] = ShardPlaces.from_samples(shard.name, good, crc=False)
    return out


def read_rows(corpus: Corpus, shard: CorpusShard, places: ShardPlaces, rows: Iterable[int], *,
              handler: Callable[[Skip], None]) -> dict[int, RawSample]:
    """{row: the sample with its image bytes} for ``rows`` of a shard. A sample whose bytes are not
    those recorded (CRC-32), or that cannot be read, goes to ``handler`` (it raises, or records and
    the row is left out). Runs of rows whose bytes lie together are one read."""
    rows = sorted(set(int(r) for r in rows))
    out: dict[int, RawSample] = {}
    if not rows:
        return out
    if corpus.kind == "folder":
        for r in rows:
            data = _read_file(os.path.join(shard.url, places.files[r]), places, r, handler) if places.files[r] else None
            if data is not None:
                out[r] = _sample(places, r, data, handler)
    elif (places.offsets[rows] < 0).any():  # a compressed tar: walk it to the rows
        wanted = set(rows)
        for s in _walk_rows(corpus, shard, places):
            if s.row in wanted:
                out[s.row] = _sample(places, s.row, s.data, handler)
                wanted.discard(s.row)
                if not wanted:
                    break
    else:
        for run in _runs(places, rows):
            start = int(places.offsets[run[0]])
            end = int(places.offsets[run[-1]] + places.sizes[run[-1]])
            try:
                blob = _read_range(shard.url, start, end)
            except OSError as e:
                handler(Skip(places.keys[run[0]], f"{shard.url}: unreadable bytes {start}-{end}: {e}"))
                continue
            for r in run:
                a = int(places.offsets[r]) - start
                data = blob[a:a + int(places.sizes[r])]
                if len(data) != places.sizes[r]:
                    handler(Skip(places.keys[r], f"{shard.url}: ends before the image's {places.sizes[r]} bytes"))
                    continue
                out[r] = _sample(places, r, data, handler)
    return {r: s for r, s in out.items() if s is not None}


def _sample(places: ShardPlaces, r: int, data: bytes, handler) -> RawSample | None:
    want = int(places.crcs[r])
    if want >= 0 and bytes_crc32(data) != want:
        handler(Skip(places.keys[r], f"its image bytes are not those extracted (CRC-32 {bytes_crc32(data):08x}, "
                                     f"recorded {want:08x}): the corpus changed under the store"))
        return None
    label = int(places.labels[r])
    return RawSample(places.keys[r], data, None if label < 0 else label, row=r, offset=int(places.offsets[r]),
                     size=int(places.sizes[r]))


def _runs(places: ShardPlaces, rows: list[int]) -> Iterator[list[int]]:
    """Rows grouped into runs whose bytes are in increasing order and at most ``GAP`` apart."""
    run = [rows[0]]
    for r in rows[1:]:
        prev = run[-1]
        end = places.offsets[prev] + places.sizes[prev]
        if 0 <= places.offsets[r] - end <= GAP:
            run.append(r)
        else:
            yield run
            run = [r]
    yield run


def _read_range(url: str, start: int, end: int) -> bytes:
    if is_url(url):
        import fsspec
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path, start=start, end=end)
    with open(url, "rb", buffering=0) as f:
        f.seek(start)
        return f.read(end - start)


def _read_file(path: str, places: ShardPlaces, r: int, handler) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        handler(Skip(places.keys[r], f"unreadable file: {e.strerror}"))
        return None


def _walk_rows(corpus: Corpus, shard: CorpusShard, places: ShardPlaces) -> Iterator[RawSample]:
    """A shard's stored rows by walking it from the start (its keys are the places' keys)."""
    from .walk import shard_samples, screen
    keys, known, row = places.keys, set(places.keys), 0
    for s in screen(shard_samples(corpus, shard)):
        if isinstance(s, Skip) or s.key not in known:
            continue
        if row < len(keys) and s.key == keys[row]:
            yield RawSample(s.key, s.data, s.label, s.fields, s.error, row, s.offset, s.size)
            row += 1
