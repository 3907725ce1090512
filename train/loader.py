"""The training loader: corpus shard i and store shard i streamed together.

Per epoch the shard order is shuffled (seeded by seed and epoch; the same on every rank, which
then takes ``order[rank::world]``, and each DataLoader worker ``[worker::workers]``:
``data.partition``). Within a shard, one chain per sample, in one direction:

    data.walk.align (the corpus shard in step with the stored keys: the sample's row)
    -> data.pixels.view_pixels (decoded, its view of this epoch replayed at the student's input)
    -> its target rows, sliced from the store block that holds them (``store.reads``: one
       verified read per block and array, a few large requests per shard, never one per sample;
       the next block read ahead in a thread: ``BlockRows``)

Student and teacher therefore see the same view of the same image; ``--color-jitter`` augments
the student only. With full-size decodes (``--decode full``) they see the same pixels; reduced
decodes (the default) cut each crop from the smallest JPEG scale that keeps its output size, so a
student smaller than the teacher may be cut from a smaller decode (a few levels of 255 apart:
``data.pixels``).
Targets leave the workers as stored bytes (fp16, bf16 bits as uint16, uint8 codes), stacked
into shared memory each worker reuses once the trainer releases the batch (``SharedBatches``);
``targets.decoding`` turns them into floats on the device.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from kdcache.data.corpus import Corpus, DecodeOptions
from kdcache.data.partition import current_worker, epoch_streams
from kdcache.data.pixels import Crop, sub_view, view_at, view_pixels
from kdcache.data.walk import RawSample, align, changed_since_extraction
from kdcache.errors import KdcacheError, StoreError, one_line
from kdcache.store import Store, ViewPolicy
from kdcache.store.lease import pid_alive
from kdcache.store.meta import per_image
from kdcache.store.reads import BlockBuffers

from .config import VIEW_CHOICES


class LoaderError(KdcacheError):
    pass


@dataclass(frozen=True)
class LoaderSpec:
    """What the loader reads and how it picks views."""

    store_url: str
    shards: tuple[str, ...]  # the shards to stream (complete, present in the corpus), sorted
    target_paths: tuple[str, ...]  # e.g. ("vit/cls", "vit/patch_codes")
    input_size: tuple[int, int]
    interpolation: str
    view_choice: str = "epoch"
    shuffle_buffer: int = 256
    color_jitter: float = 0.0
    seed: int = 0
    workers: int = 1  # DataLoader workers: part of the shard split (data.partition)
    decode: DecodeOptions = DecodeOptions()  # as at extraction (the store's corpus.decode)
    skip_log: str | None = None  # --skip-corrupt: corrupt shards are skipped and recorded here
    verify: bool = True  # check every block read (off only to measure the checks' cost: bench load)
    sub_views: float = 0.0  # --sub-views: a random box inside the stored view (its smallest share of the area)
    dense_views: bool = False  # --dense-views: fresh views (the store's view policy), targets cut from dense maps
    policy: ViewPolicy | None = None  # the store's view policy (fresh views)

    def __post_init__(self):
        if self.view_choice not in VIEW_CHOICES:
            raise LoaderError(f"view_choice {self.view_choice!r}: expected one of {', '.join(VIEW_CHOICES)}")

    @property
    def crop(self) -> Crop:
        """The student's input: what every sample's view is resized to."""
        return Crop(tuple(self.input_size), self.interpolation)


def samples_per_image(choice: str, k: int) -> int:
    """Samples an epoch takes from each stored image of K views: K with ``all``, else one."""
    return k if choice == "all" else 1


def pick_view(choice: str, k: int, *, shard: str, block: int, epoch: int, seed: int) -> int:
    """The stored view the samples of block ``block`` of a store shard take this epoch. Drawn per
    block, not per sample: in a format-2 store each view of a block is a Zarr shard of its own,
    so the loader reads the one view it uses (1/K of the bytes) instead of all K to use one."""
    if choice == "first" or k == 1:
        return 0
    if choice == "augmented":  # views 1..K-1 in turn, never the eval view: what an online run sees (train.online)
        return 1 + epoch % (k - 1)
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{shard}\0{block}".encode()).digest()[:8], "little")
    if choice == "epoch":  # every view once per K epochs, from a per-block offset
        return (epoch + h) % k
    return random.Random(f"{seed}/{epoch}/{shard}/{block}").randrange(k)


class ShardStream(IterableDataset):
    """Samples of an epoch: this rank's and worker's shards (``data.partition``) in a seeded
    shuffle buffer, student colour jitter applied. Subclasses say what one shard yields:
    ``CachedStream`` (stored targets) and ``train.online.OnlineStream`` (live teachers) share
    this order, so the same seed gives the same batches from either. A subclass defines
    ``_shard(name, epoch)``: the samples of one shard, as dicts; and may define
    ``_read_ahead(name, epoch)``: start opening the shard that comes next (called once the current one
    has delivered its first sample; for the last shard of an epoch, the first shard of the epoch
    that follows, when ``set_epoch`` said which one does).

    The epoch lives in shared memory, so a DataLoader with ``persistent_workers=True`` keeps
    its workers for the whole run: ``set_epoch`` then a new ``iter(loader)`` starts the next
    epoch in the same worker processes.
    """

    def __init__(self, corpus: Corpus, spec: LoaderSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        self.corpus, self.spec, self.rank, self.world = corpus, spec, rank, world
        self._epoch = multiprocessing.Value("i", epoch)  # inherited by the workers
        self._following = multiprocessing.Value("i", -1)  # the epoch after this one, if any

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def set_epoch(self, epoch: int, following: int | None = None) -> None:
        """The epoch the next ``iter`` streams; ``following``: the one after it (its first shard is
        opened ahead as this epoch ends: persistent workers then start it without a wait)."""
        self.epoch = epoch
        self._following.value = -1 if following is None else following

    def __iter__(self):
        yield from self._epoch_samples(self.epoch)

    def with_spec(self, spec: LoaderSpec) -> "ShardStream":
        """The same stream reading as ``spec`` says (evaluation: view 0, no shuffle)."""
        return type(self)(self.corpus, spec, rank=self.rank, world=self.world)

    def _epoch_samples(self, epoch: int):
        worker, workers = current_worker()
        spec = self.spec
        if workers != max(1, spec.workers):
            raise LoaderError(f"the loader spec says {spec.workers} workers, the DataLoader runs {workers}")
        mine = epoch_streams(spec.shards, seed=spec.seed, epoch=epoch, world=self.world, workers=workers)[self.rank][worker]
        following = self._following.value  # this worker's first shard of the next epoch follows its last of this one
        first_next = (epoch_streams(spec.shards, seed=spec.seed, epoch=following, world=self.world,
                                    workers=workers)[self.rank][worker][:1] if following >= 0 else [])
        ahead = [*((s, epoch) for s in mine[1:]), *((s, following) for s in first_next)]  # opened while each of mine streams
        rng = random.Random(f"{spec.seed}/{epoch}/{self.rank}/{worker}")
        jitter = _color_jitter(spec.color_jitter)
        buffer = []
        for i, shard in enumerate(mine):
            for n, sample in enumerate(self._shard(shard, epoch)):
                if n == 0 and i < len(ahead):  # this shard is open (its first sample is here): prepare the next
                    self._read_ahead(*ahead[i])
                if jitter is not None:
                    torch.manual_seed(rng.getrandbits(63))
                    sample["image"] = jitter(sample["image"])
                if len(buffer) < spec.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _read_ahead(self, name: str, epoch: int) -> None:
        """Nothing to prepare by default (the corpus shard is streamed as it is read)."""


class CachedStream(ShardStream):
    """Yields dicts: key, image (3, H, W) uint8, view (int), label, and the stored target rows.

    While one shard is streamed, the next one of this worker is opened in a thread (attributes,
    keys, views, and its first target block read and checked: ``_read_ahead``). Without it every
    shard began with a stall: a shard's first block is read before its first sample can leave,
    and a shard of one block (the bench's, and any corpus shard smaller than a block) had no
    overlap at all. When ``set_epoch`` names the epoch that follows, the last shard of an epoch
    opens the first shard of the next one, which then stays open between the two epochs (a
    persistent worker's next epoch starts without a stall). At most three blocks are read and
    held here (about 64 MB each): two of this shard, the first of the next; rows are views into
    their block, so a block also lives on while samples of it wait in the shuffle buffer; its memory is
    then kept for a later block (``store.reads.BlockBuffers``, at most six free)."""

    def __init__(self, corpus: Corpus, spec: LoaderSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        super().__init__(corpus, spec, epoch=epoch, rank=rank, world=world)
        self._store = None
        self._ahead: tuple[tuple[str, int], Future] | None = None  # ((shard, epoch), its opening)
        self._opener: ThreadPoolExecutor | None = None
        self._block_reader: ThreadPoolExecutor | None = None  # every shard's block reads, in turn (BlockRows)
        self._buffers = BlockBuffers()  # the memory blocks are decoded into, reused from block to block
        self._pid = os.getpid()  # the process the threads above run in

    def __iter__(self):
        if self._pid != os.getpid():  # a fork (a DataLoader worker) inherits these objects, not their threads
            self._pid, self._store, self._ahead, self._opener, self._block_reader = os.getpid(), None, None, None, None
            self._buffers = BlockBuffers()
        if self._store is None:  # opened here: in a DataLoader worker, after the fork
            self._store = Store.open(self.spec.store_url)
        if self._block_reader is None:
            self._block_reader = ThreadPoolExecutor(1, thread_name_prefix="kdcache-blocks")
        completed = False
        try:
            yield from self._epoch_samples(self.epoch)
            completed = True
        finally:  # the run stopped, or the epoch ended with no epoch to follow: a shard opened ahead is closed
            if not completed or self._ahead is None:
                self.close()

    def close(self) -> None:
        """Close a shard opened ahead and stop the opening and block-reading threads (a later ``iter``
        starts them again)."""
        self._drop_ahead()
        for pool in (self._opener, self._block_reader):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._opener = self._block_reader = None

    def _read_ahead(self, name: str, epoch: int) -> None:
        self._drop_ahead()
        if self._opener is None:
            self._opener = ThreadPoolExecutor(1, thread_name_prefix="kdcache-open")
        self._ahead = ((name, epoch), self._opener.submit(self._open, name, epoch))

    def _drop_ahead(self) -> None:
        """Close a shard opened ahead and never streamed. Its own failure, if any, is dropped
        with it: the shard was not reached (and this runs while another error may be raised)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead[1].cancel() and ahead[1].exception() is None:
            opened = ahead[1].result()
            if isinstance(opened, OpenShard):
                opened.blocks.close()

    def _open(self, name: str, epoch: int) -> OpenShard | tuple[dict, StoreError]:
        """A shard's attributes, keys, views and block reader (its first block being read: of the
        view the epoch draws for it), or (the attributes read so far, the store's error): raised
        when the shard's turn comes."""
        store, spec, attrs = self._store, self.spec, {}
        try:
            attrs = store.shard_attrs(name) or {}
            if attrs.get("complete") is not True:  # planned complete (the shard index said so): its metadata wins
                raise StoreError(f"{spec.store_url}: shard {name} is not complete, though the run planned it complete "
                                 f"(rewritten since the run started, or a stale shard index: `kdcache store stats` "
                                 f"rewrites it)")
            keys, views = store.keys(name).tolist(), store.views(name)
            return OpenShard(attrs, keys, views, BlockRows(store, name, spec.target_paths, attrs, verify=spec.verify,
                                                           reader=self._block_reader, buffers=self._buffers,
                                                           view_of=self._block_views(name, epoch, views.shape[1])))
        except StoreError as e:
            return attrs, e

    def _block_views(self, name: str, epoch: int, k: int):
        """Block index -> the stored view its samples take this epoch (``pick_view``); None with
        ``--view-choice all`` (every view). Fresh views (``--dense-views``) read per-image maps."""
        spec = self.spec
        if spec.dense_views:
            return lambda block: 0
        if spec.view_choice == "all":
            return None
        return lambda block: pick_view(spec.view_choice, k, shard=name, block=block, epoch=epoch, seed=spec.seed)

    def _shard(self, name: str, epoch: int):
        """The samples of one shard; a corrupt shard stops the run, or with ``skip_log`` ends
        here and is recorded (shard, array, reason, samples not delivered) in the skip log."""
        spec = self.spec
        delivered, attrs, blocks = 0, {}, None
        opened = None
        if self._ahead is not None and self._ahead[0] == (name, epoch):
            opened, self._ahead = self._ahead[1].result(), None
        else:  # (a shard opened ahead for an epoch that did not come: set_epoch chose another)
            self._drop_ahead()
        opened = opened if opened is not None else self._open(name, epoch)
        try:
            if not isinstance(opened, OpenShard):
                attrs, error = opened
                raise error
            attrs, keys, stored_views, blocks = opened.attrs, opened.keys, opened.views, opened.blocks
            shard = self.corpus.shard(name)
            k = stored_views.shape[1]

            sub_boxes: dict[int, np.ndarray] = {}  # --sub-views: each sample's box, drawn with its view
            picked: dict[int, list[int]] = {}  # each sample's stored views this epoch, picked once when it is decoded

            def stored(s: RawSample) -> np.ndarray:  # (views, 5): one, or with --view-choice all every stored view
                picked[s.row] = list(range(k)) if blocks.view_of is None else [blocks.block_view(s.row // blocks.block)]
                return stored_views[s.row, picked[s.row]]

            def this_epochs_view(s: RawSample, height: int, width: int) -> np.ndarray:
                if spec.dense_views:  # a fresh view, as an online run draws it (data.pixels.view_at)
                    return view_at(spec.policy, s.key, epoch + 1, height, width)
                if spec.sub_views:
                    view, sub_boxes[s.row] = sub_view(stored(s)[0], spec.seed, s.key, epoch, spec.sub_views)
                    return view
                return stored(s)

            samples = align(self.corpus, shard, keys, attrs.get("failed", []))
            for item in view_pixels(samples, views=this_epochs_view, crops=[spec.crop], decode=spec.decode,
                                    handler=changed_since_extraction(shard)):
                s = item.sample
                chosen = [epoch + 1] if spec.dense_views else picked.pop(s.row)
                extra = {}
                if spec.dense_views:  # where the targets are cut from the dense map: the view's box, and its flip
                    extra = {"dense_box": torch.from_numpy(item.views[0, :4].copy()),
                             "dense_flip": torch.tensor(float(item.views[0, 4] >= 0.5))}
                elif spec.sub_views:  # where the sub-box's targets are cut from the stored grid
                    extra = {"sub_box": torch.from_numpy(sub_boxes.pop(s.row))}
                label = sample_label(s)
                for i, v in enumerate(chosen):  # --view-choice all: every view, from this one decode and block read
                    yield {"key": s.key, "image": item.crops[0][i], "view": v, "label": label,
                           **blocks.row(s.row, 0 if spec.dense_views else v), **extra}
                    delivered += 1
        except StoreError as e:
            if not spec.skip_log:
                raise
            count = attrs.get("count", 0)
            per_image = samples_per_image(spec.view_choice, self._store.meta.view_policy.views)
            record_skip(spec.skip_log, {"epoch": epoch, "shard": name, "error": one_line(e),
                                        "samples_skipped": max(0, count * per_image - delivered) if isinstance(count, int)
                                        else 0})
        finally:  # also when the run stops mid-shard (the generator is closed)
            if blocks is not None:
                blocks.close()


@dataclass
class OpenShard:
    """A store shard ready to stream: its attributes, keys, (rows, K, 5) views, block reader."""

    attrs: dict
    keys: list
    views: np.ndarray
    blocks: "BlockRows"


class BlockRows:
    """A shard's target arrays, read one verified block at a time (the block holding the row
    asked for; rows are asked for in order, so each block is read once). While the samples of
    one block are decoded and cut, the next block is already being read, decompressed and
    checked in a thread: those release the GIL (the read, Blosc, CRC-32, the finiteness test),
    so a worker's target reads overlap its JPEG decodes instead of stalling them (on object
    storage, the request's latency too). At most two blocks are held. ``reader``: the thread to
    read in, shared by the shards of a stream (``CachedStream``); a thread of its own, ended by
    ``close``, without it. A thread started and joined per shard cost the decoding thread about 2%
    of its time in the join (sampled). ``view_of``: block index -> the one view its rows are asked
    for (only that view is read: in a format-2 store 1/K of the block's bytes); None: every view.
    ``buffers``: the memory blocks are decoded into, handed out again once no row of a block is
    held (``store.reads.BlockBuffers``: shared by the shards of a stream)."""

    def __init__(self, store: Store, shard: str, paths, attrs: dict, *, verify: bool = True, prefetch: bool = True,
                 reader: ThreadPoolExecutor | None = None, view_of=None, buffers: BlockBuffers | None = None):
        self.store, self.shard, self.attrs, self.verify, self.view_of = store, shard, attrs, verify, view_of
        self.buffers = buffers
        self.arrays = {p: store.array(shard, p) for p in paths}
        self.whole_image = {p for p in paths if per_image(p)}  # one row per image (dense maps), not per view
        self._per_view = any(p not in self.whole_image for p in paths)  # whether a view is asked of the rows read
        self._views: dict[int, int] = {}  # block index -> its view this epoch, drawn once (``block_view``)
        self.block = store.block_rows(shard, paths[0], array=self.arrays[paths[0]]) if paths else 1
        count = attrs.get("count") if isinstance(attrs.get("count"), int) else 0
        self.blocks = -(-count // self.block) if paths else 0
        self.index, self.view, self.rows = -1, None, {}
        self._own = reader is None
        self._pool = ((ThreadPoolExecutor(1, thread_name_prefix="kdcache-blocks") if self._own else reader)
                      if prefetch and self.blocks else None)
        # the first block is read while the first samples are decoded
        self._next: tuple[int, Future] | None = (0, self._pool.submit(self._read, 0)) if self._pool else None

    def block_view(self, index: int) -> int:
        """The view block ``index`` is read for (``view_of``), drawn once per block: the samples
        that ask for it and the read (in the reader thread) share the one draw."""
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = self.view_of(index)
        return view

    def _read(self, index: int) -> tuple[int | None, dict[str, np.ndarray]]:
        """(the view read, {path: rows}): per-view arrays as (rows, ...) of that view, or (rows, K, ...)."""
        view = self.block_view(index) if self.view_of is not None else None
        return view, {p: self.store.read_block(self.shard, p, index, attrs=self.attrs, array=a, verify=self.verify,
                                               view=None if p in self.whole_image else view, buffers=self.buffers)
                      for p, a in self.arrays.items()}

    def row(self, row: int, view: int) -> dict[str, torch.Tensor]:
        """{path: the stored bytes of view ``view`` of row ``row``} as tensors (bf16 bits as uint16)."""
        if row // self.block != self.index:
            self.index = row // self.block
            ahead, self._next = self._next, None
            self.view, self.rows = (ahead[1].result() if ahead is not None and ahead[0] == self.index
                                    else self._read(self.index))
            if self._pool is not None and self.index + 1 < self.blocks:
                self._next = (self.index + 1, self._pool.submit(self._read, self.index + 1))
        if self.view is not None and view != self.view and self._per_view:
            raise LoaderError(f"shard {self.shard}: row {row} asked for view {view}, but its block was read for view "
                              f"{self.view} (the view is drawn per block: train.loader.pick_view)")
        out, r = {}, row - self.index * self.block
        for p, b in self.rows.items():
            a = b[r] if p in self.whole_image or self.view is not None else b[r, view]
            out[p] = torch.from_numpy(np.ascontiguousarray(a) if a.ndim else np.array(a))  # (a log-sum-exp is 0-d)
        return out

    def close(self) -> None:
        """Stop reading ahead: a block not yet being read is not read; one being read is finished
        and dropped (waited for here only in a thread of its own, which ends)."""
        ahead, self._next = self._next, None
        if ahead is not None:
            ahead[1].cancel()
        if self._pool is not None and self._own:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


def sample_label(sample: RawSample) -> int:
    """The corpus label (webdataset cls, image-folder class) for the task loss; -1 when none
    (an int: ``collate`` makes the batch's one tensor of them)."""
    return -1 if sample.label is None else int(sample.label)


def record_skip(path: str, record: dict) -> None:
    """One JSON line per skipped shard or sample; O_APPEND keeps lines whole across worker processes."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_skips(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _color_jitter(strength: float):
    if not strength:
        return None
    from torchvision.transforms import v2
    return v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength)


def collate(samples: list[dict], into: dict[str, torch.Tensor] | None = None) -> dict:
    """Samples -> a batch: keys as a list, every other field through torch's ``default_collate``
    (tensors stacked, ints and floats made one tensor), which in a DataLoader worker stacks
    straight into shared memory. ``into``: tensors of the batch's shapes to put those fields in
    instead (``SharedBatches``)."""
    out = {"key": [s["key"] for s in samples]}
    for k in samples[0]:
        if k in out:
            continue
        values = [s[k] for s in samples]
        if into and k in into:
            out[k] = (torch.stack(values, out=into[k]) if isinstance(values[0], torch.Tensor)
                      else into[k].copy_(torch.tensor(values, dtype=into[k].dtype)))
        else:
            out[k] = default_collate(values)
    return out


class BatchSlot:
    """Which of a worker's reused batch buffers a batch was collated into (``SharedBatches``), with
    the worker's flags, shared with the trainer: 1 while the batch is out, 0 once released. The
    copy the trainer receives releases the buffer once: when ``release_batch`` is called, or when
    the batch (this slot, its ``"slot"``) is dropped, whichever comes first. A batch's tensors are
    therefore the buffer's while the batch dict lives; a batch dropped unconsumed (the DataLoader
    drops the batches in flight when an epoch is cut short, as a rank with more batches than the
    others does) hands its buffer back."""

    def __init__(self, flags: torch.Tensor, index: int, *, receiver: int | None = None):
        self.flags, self.index = flags, index  # int32 flags, one per buffer, in shared memory
        self._receiver = receiver  # the process that received it (``_received_batch``): only there does it release

    def release(self) -> None:
        if self._receiver == os.getpid():  # not the worker's own copy, nor one a fork inherited
            self._receiver = None
            self.flags[self.index] = 0

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit torch may be gone; the worker is then gone too
            pass


def release_batch(batch: dict) -> None:
    """Done with ``batch``: its worker may collate a later batch into the same shared memory.
    Call once nothing reads the batch's host tensors any more (after the step that used them;
    a pinned copy, as ``pin_memory`` makes, is the consumer's own); dropping the batch does the
    same. Once per batch: a second call does nothing. Batches collated without a buffer (in the
    trainer's process, or when every buffer was out) are left alone."""
    slot = batch.pop("slot", None)
    if isinstance(slot, BatchSlot):
        slot.release()


class SharedBatches:
    """The training DataLoader's ``collate_fn``: ``collate``, into shared memory each worker
    reuses, sent to the trainer as a handle to memory it already maps.

    ``default_collate`` stacks a worker's batch into new shared-memory segments, one per field,
    which the kernel zeroes and maps in page by page and frees when the trainer drops the batch:
    with 148 KiB of fp16 targets per sample (ViT-S/16) about 0.13 ms of kernel time per sample in
    the worker, over a quarter of what decoding and cutting a small image takes there. And every
    segment crosses to the trainer by its file descriptor, which torch passes over a connection
    to a thread of the worker, one per field per batch (measured: ``docs/benchmarks.md#loading``).
    Here each worker keeps up to ``buffers`` batches of shared memory (every field but the keys)
    and collates a batch into one of the same shapes that the trainer has handed back
    (``release_batch``, or the batch dropped: ``BatchSlot``); its ``slot`` says which. A buffer's
    descriptors cross once, with the first batch in it; the trainer keeps that buffer mapped
    (``_received_batch``), and every later batch in it crosses as (worker, buffer, keys). A batch
    that finds no free buffer, and no room for another (every one out: a consumer that keeps its
    batches), is collated as ``collate`` does. A buffer is written again only after its release,
    so a batch kept is never overwritten. In the trainer's own process (no workers) it is
    ``collate``: nothing crosses processes."""

    def __init__(self, buffers: int = 8):
        self.buffers = buffers
        self._pid = None  # the worker process the buffers below belong to
        self._flags: torch.Tensor | None = None
        self._slots: list[tuple[dict, dict[str, torch.Tensor]]] = []  # (shapes, tensors) per buffer
        self._sent: set[int] = set()  # buffers whose memory the trainer has been sent

    def __call__(self, samples: list[dict]):
        if get_worker_info() is None:
            return collate(samples)
        if self._pid != os.getpid():  # first batch of this worker (a fork copies its parent's state)
            self._pid, self._slots, self._sent = os.getpid(), [], set()
            self._flags = torch.zeros(self.buffers, dtype=torch.int32).share_memory_()
        first = samples[0]
        shapes = {k: _batch_shape(v, len(samples)) for k, v in first.items() if k != "key"}
        shapes = {k: v for k, v in shapes.items() if v is not None}
        index = self._free_slot(shapes)
        if index is None:
            return collate(samples)
        return _BufferedBatch(collate(samples, into=self._slots[index][1]), self, index)

    def _crossing(self, batch: dict, index: int) -> tuple:
        """What crosses to the trainer for a batch in buffer ``index``: (worker, buffer, the fields
        not in it, the buffer's tensors and flags the first time it crosses, else None)."""
        tensors, shared = self._slots[index][1], None
        if index not in self._sent:
            self._sent.add(index)
            shared = (tensors, self._flags)
        return self._pid, index, {k: v for k, v in batch.items() if k not in tensors}, shared

    def _free_slot(self, shapes: dict) -> int | None:
        """A released buffer of these shapes, marked out; a new one while fewer than ``buffers``
        exist; else None."""
        flags = self._flags.numpy()
        for i, (held, _) in enumerate(self._slots):
            if flags[i] == 0 and held == shapes:
                flags[i] = 1
                return i
        if len(self._slots) == self.buffers or not shapes:
            return None
        self._slots.append((shapes, {k: _shared_empty(shape, dtype) for k, (shape, dtype) in shapes.items()}))
        flags[len(self._slots) - 1] = 1
        return len(self._slots) - 1


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """As ``default_collate`` allocates in a worker: typed shared storage, then the shape."""
    like = torch.empty(0, dtype=dtype)
    return like.new(like._typed_storage()._new_shared(math.prod(shape))).resize_(shape)


def _batch_shape(value, batch: int) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of a field of ``batch`` samples as ``collate`` makes it; None for a field
    not kept in a buffer (not a tensor, int or float)."""
    if isinstance(value, torch.Tensor):
        return (batch, *value.shape), value.dtype
    if isinstance(value, (int, float)):  # the dtypes default_collate gives them
        return (batch,), torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int) else torch.float64
    return None


class _BufferedBatch:
    """A batch a worker collated into buffer ``index`` (``SharedBatches``), as it crosses to the
    trainer: pickled (in the worker's queue thread, in the order batches are sent) with the
    buffer's tensors and flags the first time, as just (worker, buffer) after that; the trainer
    unpickles it into the batch dict (``_received_batch``)."""

    def __init__(self, batch: dict, buffers: SharedBatches, index: int):
        self.batch, self.buffers, self.index = batch, buffers, index

    def __reduce__(self):
        return _received_batch, self.buffers._crossing(self.batch, self.index)


_MAPPED: dict[tuple[int, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}  # (worker pid, buffer) -> (tensors, flags)
_MAPPED_LOCK = threading.Lock()  # two DataLoaders may unpickle at once (a pin-memory thread each)


def _received_batch(pid: int, index: int, fields: dict, shared) -> dict:
    """The trainer's side of ``_BufferedBatch``: the batch dict over the buffer's tensors, mapped
    here when its first batch came (``shared``) and kept while the worker lives (the buffers of
    workers that have exited are forgotten when a new worker's first buffer arrives)."""
    with _MAPPED_LOCK:
        if shared is not None:
            if not any(p == pid for p, _ in _MAPPED):
                gone = {p for p, _ in _MAPPED if not pid_alive(p)}
                for key in [k for k in _MAPPED if k[0] in gone]:
                    del _MAPPED[key]
            _MAPPED[(pid, index)] = shared
        mapped = _MAPPED.get((pid, index))
    if mapped is None:
        raise LoaderError(f"a batch from worker {pid} names buffer {index}, whose memory never reached the trainer")
    tensors, flags = mapped
    return {**fields, **tensors, "slot": BatchSlot(flags, index, receiver=os.getpid())}


def training_loader(dataset: IterableDataset, *, batch_size: int, workers: int, pin_memory: bool = False,
                    drop_last: bool = True) -> DataLoader:
    """The DataLoader training streams through (``train.fit``; ``kdcache bench load`` measures it):
    workers kept from epoch to epoch, four batches ahead each, batches collated into reused shared
    memory (``SharedBatches``): hand each back with ``release_batch`` once done with it."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=SharedBatches(), pin_memory=pin_memory,
                      drop_last=drop_last, prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
