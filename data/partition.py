"""Who reads what: the one place for rank, world and DataLoader-worker arithmetic.

Extraction and quantization split whole corpus shards across ranks (``rank_share``, no
communication: a shard has exactly one writer). Training, evaluation and the benchmarks split
an epoch **by sample** (Mosaic streaming's and torch's ``DistributedSampler``'s promise):

1. **The epoch's order** (``EpochOrder``): every stored sample of every shard, as the same
   sequence on every rank. Blocks (runs of ``block`` consecutive rows of a shard, one Zarr shard
   of every target array, one byte range of a corpus tar) come in an order seeded by
   ``(seed, epoch)``; then the samples of each window of ``window`` consecutive positions are
   permuted (seeded by ``(seed, epoch, window)``). Reads stay sequential (a block is read once,
   whole) while consecutive samples mix several blocks of several shards.
2. **The split** (``split_epoch``): the positions still to deliver this epoch (all of them, or
   what a checkpoint left) are cut into ``world`` equal contiguous rank shares, each rank share
   into batches, and the batches into ``workers`` contiguous runs, one per DataLoader worker.
   Every position reaches exactly one (rank, worker) stream, whatever the number of shards:
   one shard and 256 GPUs, or 10,000 shards and two. What ``last_batch`` decides (``LAST_BATCH``)
   is the only difference from the order: ``partial`` (the default, torch's defaults) pads the
   epoch to a multiple of ``world`` with fewer than ``world`` repeats and lets the last step of
   every rank be smaller; ``drop`` drops the last global partial batch (fewer than
   ``world x batch`` samples); ``pad`` pads it with repeats to a full one.
3. **A resume** (``remaining_after``): each stream delivers its run in order, so what a rank has
   consumed is a prefix of each of its streams; the checkpoint keeps the positions not yet
   delivered, and the resumed run splits those (at any world size and worker count) without
   reading anything before them.

Everything here is plain Python over integers: every rank computes the same plan from the
shards' counts, with no communication and no randomness that differs between machines
(``random.Random`` seeded by strings is stable across Python versions and platforms).
"""
from __future__ import annotations

import bisect
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

from kdcache.errors import KdcacheError

T = TypeVar("T")

# which stored view a block's samples take (``pick_view``); all: every view, each its own sample (repeated augmentation)
VIEW_CHOICES = ("epoch", "random", "first", "augmented", "all")
LAST_BATCH = ("partial", "drop", "pad")  # what happens to the last global partial batch (see the module doc)

Ranges = list[tuple[int, int]]  # half-open [start, end) runs of epoch-order positions, in delivery order


def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """--rank/--world-size (SLURM arrays), else torchrun's RANK/WORLD_SIZE, else 0/1."""
    try:
        rank = rank if rank is not None else int(os.environ.get("RANK", 0))
        world = world if world is not None else int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise KdcacheError("RANK / WORLD_SIZE in the environment are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise KdcacheError(f"--rank {rank} / --world-size {world}: need 0 <= rank < world-size")
    return rank, world


def rank_share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Whole items (corpus shards) of one rank: extraction and quantization, one writer per shard."""
    return list(items)[rank::world]


def worker_share(items: Sequence[T], worker: int, workers: int) -> list[T]:
    return list(items)[worker::max(1, workers)]


def current_worker() -> tuple[int, int]:
    """(worker id, workers) inside a DataLoader worker; (0, 1) in the main process."""
    from torch.utils.data import get_worker_info
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


# -- which view a block takes ----------------------------------------------------------------

def samples_per_image(choice: str, k: int) -> int:
    """Samples an epoch takes from each stored image of K views: K with ``all``, else one."""
    return k if choice == "all" else 1


def pick_view(choice: str, k: int, *, shard: str, block: int, epoch: int, seed: int) -> int:
    """The stored view the samples of block ``block`` of a store shard take this epoch. Drawn per
    block, not per sample: each view of a block is a Zarr shard of its own (format 2 and later),
    so the loader reads the one view it uses (1/K of the bytes) instead of all K to use one."""
    if choice == "first" or k == 1:
        return 0
    if choice == "augmented":  # views 1..K-1 in turn, never the eval view: what an online run sees (train.online)
        return 1 + epoch % (k - 1)
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{shard}\0{block}".encode()).digest()[:8], "little")
    if choice == "epoch":  # every view once per K epochs, from a per-block offset
        return (epoch + h) % k
    return random.Random(f"{seed}/{epoch}/{shard}/{block}").randrange(k)


# -- the epoch's order -------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardRows:
    """One shard as the plan sees it: its name, its stored images, rows per block; ``digest``, when
    set, what its digests must hash to (a resumed run: the store it was planned on)."""

    name: str
    count: int
    block: int
    digest: str | None = None

    def blocks(self) -> int:
        return -(-self.count // max(1, self.block))


@dataclass(frozen=True)
class Sample:
    """One position of an epoch's order: shard (its index in the plan's shards), row, and
    ``slot`` (which of an image's samples: its view with ``--view-choice all``, else 0)."""

    position: int
    shard: int
    row: int
    slot: int = 0

    @property
    def block_of(self) -> tuple[int, int]:
        return self.shard, self.row


class EpochOrder:
    """The sample order of one epoch, the same on every rank (see the module doc).

    ``shards``: the shards in a fixed order (sorted by name); ``per_image``: samples per image (K
    with ``--view-choice all``). ``shuffle`` off: shards, blocks and rows in store order (evaluation).
    Only the blocks' order is materialised (one entry per block); a position's sample is found by
    bisection, and only the windows a caller asks about are permuted."""

    def __init__(self, shards: Sequence[ShardRows], *, seed: int, epoch: int, window: int = 256, per_image: int = 1,
                 shuffle: bool = True):
        if window < 1 or per_image < 1:
            raise KdcacheError(f"epoch order: window {window} and samples per image {per_image} must be >= 1")
        self.shards, self.seed, self.epoch, self.per_image = tuple(shards), seed, epoch, per_image
        self.window, self.shuffle = window, shuffle
        blocks = [(i, start, min(s.block, s.count - start)) for i, s in enumerate(self.shards)
                  for start in range(0, s.count, max(1, s.block))]
        if shuffle:
            random.Random(f"kdcache/blocks/{seed}/{epoch}").shuffle(blocks)
        self.blocks = blocks  # (shard index, first row, rows), in this epoch's order
        self.starts = [0]  # the first position of every block
        for _, _, rows in blocks:
            self.starts.append(self.starts[-1] + rows * per_image)
        self.total = self.starts[-1]
        self._perms: dict[int, list[int]] = {}

    def _base(self, q: int) -> Sample:
        """The sample at position ``q`` of the blocks' order (before the window permutation)."""
        b = bisect.bisect_right(self.starts, q) - 1
        shard, first, _ = self.blocks[b]
        offset = q - self.starts[b]
        return Sample(q, shard, first + offset // self.per_image, offset % self.per_image)

    def _permutation(self, w: int) -> list[int]:
        perm = self._perms.get(w)
        if perm is None:
            size = min(self.window, self.total - w * self.window)
            perm = list(range(size))
            random.Random(f"kdcache/window/{self.seed}/{self.epoch}/{w}").shuffle(perm)
            if len(self._perms) > 4:  # a stream walks the windows in order: keep a few
                self._perms.clear()
            self._perms[w] = perm
        return perm

    def __getitem__(self, position: int) -> Sample:
        if not 0 <= position < self.total:
            raise IndexError(f"position {position} is outside the epoch's {self.total} samples")
        if not self.shuffle:
            return self._base(position)
        w, i = divmod(position, self.window)
        s = self._base(w * self.window + self._permutation(w)[i])
        return Sample(position, s.shard, s.row, s.slot)

    def samples(self, ranges: Ranges):
        """The samples at these positions, in the order given."""
        for start, end in ranges:
            for p in range(start, end):
                yield self[p]


# -- the split --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """One epoch cut into streams: ``runs[rank][worker]`` are the epoch-order positions each
    (rank, DataLoader worker) delivers, in order; every rank takes ``steps`` steps (the last one
    smaller with ``last_batch`` ``partial``). ``planned``: positions delivered in all, repeats
    included; ``dropped``/``padded``: what ``last_batch`` left out or repeated."""

    runs: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
    steps: int
    batch_size: int
    planned: int
    dropped: int
    padded: int

    @property
    def world(self) -> int:
        return len(self.runs)

    @property
    def workers(self) -> int:
        return len(self.runs[0]) if self.runs else 1

    def run(self, rank: int, worker: int) -> Ranges:
        return list(self.runs[rank][worker])

    @property
    def smallest_batch(self) -> int:
        """The fewest samples any batch of this epoch holds (a DataLoader worker's last batch may be
        partial); the batch size when every stream is empty."""
        sizes = [n % self.batch_size or self.batch_size
                 for rank in self.runs for run in rank if (n := sum(e - s for s, e in run))]
        return min(sizes, default=self.batch_size)

    def stream_id(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def streams(self):
        """(stream id, its run) for every (rank, worker)."""
        for r, rank in enumerate(self.runs):
            for w, run in enumerate(rank):
                yield self.stream_id(r, w), list(run)


def total(ranges: Ranges) -> int:
    return sum(e - s for s, e in ranges)


def take(ranges: Ranges, start: int, count: int) -> Ranges:
    """Positions ``start .. start + count`` of the sequence the ranges make, as ranges."""
    out, skip = [], start
    for s, e in ranges:
        n = e - s
        if skip >= n:
            skip -= n
            continue
        a = s + skip
        b = min(e, a + count)
        skip = 0
        if b > a:
            out.append((a, b))
            count -= b - a
        if count == 0:
            break
    return out


def _cycle(ranges: Ranges, count: int) -> Ranges:
    """The first ``count`` positions of the ranges, repeated from their start as often as needed."""
    out, n = [], total(ranges)
    while count > 0 and n:
        part = take(ranges, 0, min(count, n))
        out += part
        count -= total(part)
    return out


def split_epoch(remaining: Ranges, *, world: int, workers: int, batch_size: int, last_batch: str = "partial") -> Split:
    """Cut the positions ``remaining`` (in delivery order) into ``world`` x ``workers`` streams:
    equal contiguous rank shares, each cut into batches, the batches into contiguous worker runs
    (whole batches; the last batch of a rank, when smaller, ends one of them)."""
    if last_batch not in LAST_BATCH:
        raise KdcacheError(f"--last-batch {last_batch!r}: expected one of {', '.join(LAST_BATCH)}")
    if world < 1 or workers < 0 or batch_size < 1:
        raise KdcacheError(f"split: world {world}, workers {workers}, batch size {batch_size}")
    workers = max(1, workers)
    n = total(remaining)
    dropped = padded = 0
    if last_batch == "drop":
        dropped = n % (world * batch_size)
        seq = take(remaining, 0, n - dropped)
    else:
        padded = (-n) % (world * batch_size if last_batch == "pad" else world) if n else 0
        seq = list(remaining) + _cycle(remaining, padded)
    share = total(seq) // world
    steps = -(-share // batch_size)
    base, extra = divmod(steps, workers)
    runs = []
    for r in range(world):
        mine, first = take(seq, r * share, share), 0
        per_worker = []
        for w in range(workers):
            nb = base + (1 if w < extra else 0)
            lo, hi = first * batch_size, min(share, (first + nb) * batch_size)
            per_worker.append(tuple(take(mine, lo, max(0, hi - lo))))
            first += nb
        runs.append(tuple(per_worker))
    return Split(runs=tuple(runs), steps=steps, batch_size=batch_size, planned=share * world, dropped=dropped,
                 padded=padded)


def epoch_split(total_samples: int, *, world: int, workers: int, batch_size: int, last_batch: str = "partial",
                remaining: Ranges | None = None) -> Split:
    """The split of an epoch of ``total_samples`` positions, or of what a checkpoint left of it."""
    return split_epoch([(0, total_samples)] if remaining is None else remaining, world=world, workers=workers,
                       batch_size=batch_size, last_batch=last_batch)


def merge(ranges) -> Ranges:
    """Sorted, overlapping and touching ranges joined."""
    out: Ranges = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(ranges: Ranges, minus: Ranges) -> Ranges:
    """Positions of ``ranges`` not in ``minus`` (both merged first), in position order."""
    out, minus = [], merge(minus)
    for s, e in merge(ranges):
        cur = s
        for ms, me in minus:
            if me <= cur or ms >= e:
                continue
            if ms > cur:
                out.append((cur, ms))
            cur = max(cur, me)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out


def remaining_after(split: Split, consumed: dict[int, int], remaining: Ranges) -> Ranges:
    """What is left of an epoch once each stream ``id`` has delivered its first ``consumed[id]``
    samples: the positions of ``remaining`` (what the epoch started from; the dropped tail
    included, for a resumed split to decide again) none of the streams delivered, in position
    order. A repeat delivered (padding) counts for its position."""
    delivered = []
    for sid, run in split.streams():
        delivered += take(run, 0, consumed.get(sid, 0))
    return subtract(remaining, delivered)


def check_remaining(remaining, epoch_total: int) -> Ranges:
    """A checkpoint's positions, validated against the epoch they belong to: a position past its
    end (the store changed, or the file was edited) is refused, never wrapped."""
    if not isinstance(remaining, list) or not all(isinstance(r, (list, tuple)) and len(r) == 2 and
                                                  all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                                                  for r in remaining):
        raise KdcacheError("--resume: the checkpoint's position in the epoch is not a list of [start, end] pairs")
    out = [(int(s), int(e)) for s, e in remaining]
    bad = next(((s, e) for s, e in out if not 0 <= s <= e <= epoch_total), None)
    if bad is not None:
        raise KdcacheError(f"--resume: the checkpoint's position [{bad[0]}, {bad[1]}) is past the end of the epoch "
                           f"({epoch_total} samples): the store is not the one the run was checkpointed on")
    return merge(out)


def delivered_share(shards: Sequence[ShardRows], *, world: int, workers: int, batch_size: int,
                    last_batch: str = "partial", per_image: int = 1) -> dict:
    """What an epoch delivers for a store and a cluster (``kdcache bench scale --plan``): the
    trainer's own split, counted (no order is materialised: only counts matter here)."""
    n = sum(s.count for s in shards) * per_image
    split = epoch_split(n, world=world, workers=workers, batch_size=batch_size, last_batch=last_batch)
    unique = n - split.dropped
    return {"samples": n, "steps": split.steps, "delivered_unique": unique, "share": unique / n if n else 0.0,
            "dropped": split.dropped, "padded": split.padded, "repeats_share": split.padded / n if n else 0.0}
