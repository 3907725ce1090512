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
Targets leave the workers as stored bytes (fp16, bf16 bits as uint16, uint8 codes);
``targets.decoding`` turns them into floats on the device.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
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
from kdcache.store.meta import per_image

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


def pick_view(choice: str, k: int, *, key: str, epoch: int, seed: int) -> int:
    if choice == "first" or k == 1:
        return 0
    if choice == "augmented":  # views 1..K-1 in turn, never the eval view: what an online run sees (train.online)
        return 1 + epoch % (k - 1)
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little")
    if choice == "epoch":  # every view once per K epochs, from a per-key offset
        return (epoch + h) % k
    return random.Random(f"{seed}/{epoch}/{key}").randrange(k)


class ShardStream(IterableDataset):
    """Samples of an epoch: this rank's and worker's shards (``data.partition``) in a seeded
    shuffle buffer, student colour jitter applied. Subclasses say what one shard yields:
    ``CachedStream`` (stored targets) and ``train.online.OnlineStream`` (live teachers) share
    this order, so the same seed gives the same batches from either. A subclass defines
    ``_shard(name, epoch)``: the samples of one shard, as dicts; and may define
    ``_read_ahead(name)``: start opening the shard that comes next (called once the current one
    has delivered its first sample).

    The epoch lives in shared memory, so a DataLoader with ``persistent_workers=True`` keeps
    its workers for the whole run: ``set_epoch`` then a new ``iter(loader)`` starts the next
    epoch in the same worker processes.
    """

    def __init__(self, corpus: Corpus, spec: LoaderSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        self.corpus, self.spec, self.rank, self.world = corpus, spec, rank, world
        self._epoch = multiprocessing.Value("i", epoch)  # inherited by the workers

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        rng = random.Random(f"{spec.seed}/{epoch}/{self.rank}/{worker}")
        jitter = _color_jitter(spec.color_jitter)
        buffer = []
        for i, shard in enumerate(mine):
            for n, sample in enumerate(self._shard(shard, epoch)):
                if n == 0 and i + 1 < len(mine):  # this shard is open (its first sample is here): prepare the next
                    self._read_ahead(mine[i + 1])
                if jitter is not None:
                    torch.manual_seed(rng.getrandbits(63))
                    sample["image"] = jitter(sample["image"])
                if len(buffer) < spec.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _read_ahead(self, name: str) -> None:
        """Nothing to prepare by default (the corpus shard is streamed as it is read)."""


class CachedStream(ShardStream):
    """Yields dicts: key, image (3, H, W) uint8, view (int), label, and the stored target rows.

    While one shard is streamed, the next one of this worker is opened in a thread (attributes,
    keys, views, and its first target block read and checked: ``_read_ahead``). Without it every
    shard began with a stall: a shard's first block is read before its first sample can leave,
    and a shard of one block (the bench's, and any corpus shard smaller than a block) had no
    overlap at all. At most three blocks are held (about 64 MB each): two of this shard, the first
    of the next."""

    def __init__(self, corpus: Corpus, spec: LoaderSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        super().__init__(corpus, spec, epoch=epoch, rank=rank, world=world)
        self._store = None
        self._ahead: tuple[str, Future] | None = None
        self._opener: ThreadPoolExecutor | None = None

    def __iter__(self):
        if self._store is None:  # opened here: in a DataLoader worker, after the fork
            self._store = Store.open(self.spec.store_url)
        try:
            yield from self._epoch_samples(self.epoch)
        finally:  # the run stopped, or the epoch ended: a shard opened ahead and never streamed is closed
            self._drop_ahead()
            if self._opener is not None:
                self._opener.shutdown(wait=True, cancel_futures=True)
                self._opener = None

    def _read_ahead(self, name: str) -> None:
        self._drop_ahead()
        if self._opener is None:
            self._opener = ThreadPoolExecutor(1, thread_name_prefix="kdcache-open")
        self._ahead = (name, self._opener.submit(self._open, name))

    def _drop_ahead(self) -> None:
        """Close a shard opened ahead and never streamed. Its own failure, if any, is dropped
        with it: the shard was not reached (and this runs while another error may be raised)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead[1].cancel() and ahead[1].exception() is None:
            opened = ahead[1].result()
            if isinstance(opened, OpenShard):
                opened.blocks.close()

    def _open(self, name: str) -> OpenShard | tuple[dict, StoreError]:
        """A shard's attributes, keys, views and block reader (its first block being read), or
        (the attributes read so far, the store's error): raised when the shard's turn comes."""
        store, spec, attrs = self._store, self.spec, {}
        try:
            attrs = store.shard_attrs(name) or {}
            if attrs.get("complete") is not True:  # planned complete (the shard index said so): its metadata wins
                raise StoreError(f"{spec.store_url}: shard {name} is not complete, though the run planned it complete "
                                 f"(rewritten since the run started, or a stale shard index: `kdcache store stats` "
                                 f"rewrites it)")
            keys, views = store.keys(name).tolist(), store.views(name)
            blocks = BlockRows(store, name, spec.target_paths, attrs, verify=spec.verify, shared=get_worker_info() is not None)
            return OpenShard(attrs, keys, views, blocks)
        except StoreError as e:
            return attrs, e

    def _shard(self, name: str, epoch: int):
        """The samples of one shard; a corrupt shard stops the run, or with ``skip_log`` ends
        here and is recorded (shard, array, reason, samples not delivered) in the skip log."""
        spec = self.spec
        delivered, attrs, blocks = 0, {}, None
        ahead, opened = self._ahead, None
        if ahead is not None and ahead[0] == name:
            self._ahead, opened = None, ahead[1].result()
        opened = opened if opened is not None else self._open(name)
        try:
            if not isinstance(opened, OpenShard):
                attrs, error = opened
                raise error
            attrs, keys, stored_views, blocks = opened.attrs, opened.keys, opened.views, opened.blocks
            shard = self.corpus.shard(name)
            k = stored_views.shape[1]

            sub_boxes: dict[int, np.ndarray] = {}  # --sub-views: each sample's box, drawn with its view

            def stored(s: RawSample) -> tuple[int, np.ndarray]:
                v = pick_view(spec.view_choice, k, key=s.key, epoch=epoch, seed=spec.seed)
                return v, stored_views[s.row, v]

            def this_epochs_view(s: RawSample, height: int, width: int) -> np.ndarray:
                if spec.dense_views:  # a fresh view, as an online run draws it (data.pixels.view_at)
                    return view_at(spec.policy, s.key, epoch + 1, height, width)
                if spec.sub_views:
                    view, sub_boxes[s.row] = sub_view(stored(s)[1], spec.seed, s.key, epoch, spec.sub_views)
                    return view
                return stored(s)[1]

            samples = align(self.corpus, shard, keys, attrs.get("failed", []))
            for item in view_pixels(samples, views=this_epochs_view, crops=[spec.crop], decode=spec.decode,
                                    handler=changed_since_extraction(shard)):
                s = item.sample
                v = stored(s)[0]
                extra = {}
                if spec.dense_views:  # where the targets are cut from the dense map: the view's box, and its flip
                    v = epoch + 1
                    extra = {"dense_box": torch.from_numpy(item.views[0, :4].copy()),
                             "dense_flip": torch.tensor(float(item.views[0, 4] >= 0.5))}
                elif spec.sub_views:  # where the sub-box's targets are cut from the stored grid
                    extra = {"sub_box": torch.from_numpy(sub_boxes.pop(s.row))}
                yield {"key": s.key, "image": item.crops[0][0], "view": v, "label": sample_label(s),
                       **blocks.row(s.row, 0 if spec.dense_views else v), **extra}
                delivered += 1
        except StoreError as e:
            if not spec.skip_log:
                raise
            count = attrs.get("count", 0)
            record_skip(spec.skip_log, {"epoch": epoch, "shard": name, "error": one_line(e),
                                        "samples_skipped": max(0, count - delivered) if isinstance(count, int) else 0})
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
    storage, the request's latency too). This reader holds at most two blocks.

    A row is a view into its block, never a copy. In a DataLoader worker (``shared``) each block
    is decompressed straight into shared memory, so a batch crosses to the trainer as references
    to its blocks (``collate``, ``StoredRows``) instead of fresh per-batch copies; a block then
    lives on while samples of it wait in the shuffle buffer or in batches not yet gathered."""

    def __init__(self, store: Store, shard: str, paths, attrs: dict, *, verify: bool = True, prefetch: bool = True,
                 shared: bool = False):
        self.store, self.shard, self.attrs, self.verify, self.shared = store, shard, attrs, verify, shared
        self.arrays = {p: store.array(shard, p) for p in paths}
        self.whole_image = {p for p in paths if per_image(p)}  # one row per image (dense maps), not per view
        self.block = store.block_rows(shard, paths[0]) if paths else 1
        count = attrs.get("count") if isinstance(attrs.get("count"), int) else 0
        self.blocks = -(-count // self.block) if paths else 0
        self.index, self.rows = -1, {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-blocks") if prefetch and self.blocks else None
        # the first block is read while the first samples are decoded
        self._next: tuple[int, Future] | None = (0, self._pool.submit(self._read, 0)) if self._pool else None

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        return {p: self._read_array(p, a, index) for p, a in self.arrays.items()}

    def _read_array(self, path: str, array, index: int) -> torch.Tensor:
        made: list[torch.Tensor] = []

        def shared_memory(shape: tuple, dtype: np.dtype) -> np.ndarray:
            made.append(shared_tensor(shape, dtype))
            return made[-1].numpy()

        rows = self.store.read_block(self.shard, path, index, attrs=self.attrs, array=array, verify=self.verify,
                                     alloc=shared_memory if self.shared else None)
        if made and rows.ctypes.data == made[0].data_ptr():  # decompressed into shared memory: its leading rows
            return made[0][:len(rows)]
        rows = torch.from_numpy(np.ascontiguousarray(rows))
        return rows.share_memory_() if self.shared else rows  # (a layout zarr decoded: moved once per block)

    def row(self, row: int, view: int) -> dict[str, torch.Tensor]:
        """{path: the stored bytes of view ``view`` of row ``row``} as views into the block (bf16 bits as uint16)."""
        if row // self.block != self.index:
            self.index = row // self.block
            ahead, self._next = self._next, None
            self.rows = ahead[1].result() if ahead is not None and ahead[0] == self.index else self._read(self.index)
            if self._pool is not None and self.index + 1 < self.blocks:
                self._next = (self.index + 1, self._pool.submit(self._read, self.index + 1))
        at = row - self.index * self.block
        return {p: b[at] if p in self.whole_image else b[at, view] for p, b in self.rows.items()}

    def close(self) -> None:
        """Stop reading ahead (a block being read is finished and dropped)."""
        self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def shared_tensor(shape: tuple, dtype: np.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (what ``default_collate`` allocates in a worker)."""
    like = torch.from_numpy(np.empty(0, dtype=dtype))
    storage = torch.UntypedStorage._new_shared(flat_size(shape) * like.element_size())
    return like.new_empty(0).set_(storage, 0, tuple(shape))


class StoredRows:
    """One stored array's rows of a batch, left where the worker read them: references to the
    shared-memory blocks (each sent once per batch, mapped once by the trainer's process) and
    each row's place in them. ``gather`` copies the rows into one tensor, in the trainer's
    process (or ``pin_memory``: straight into pinned memory, when the DataLoader pins). Before,
    ``default_collate`` stacked every batch into fresh shared memory in the worker: 2.4 MB of new
    pages per batch of ViT-S patch tokens, faulted in on every batch (1.4 ms against 0.08 for the
    same stack into reused memory, measured)."""

    def __init__(self, rows: list[torch.Tensor]):
        blocks: dict[int, int] = {}
        self.bases: list[torch.Tensor] = []  # each block whole, flat
        self.places: list[int] = []  # each row's (block, element offset), flattened
        for r in rows:
            storage = r.untyped_storage()
            b = blocks.setdefault(storage.data_ptr(), len(self.bases))
            if b == len(self.bases):
                self.bases.append(r.new_empty(0).set_(storage))
            self.places += [b, r.storage_offset()]
        self.shape, self.dtype = tuple(rows[0].shape), rows[0].dtype

    @staticmethod
    def holds(rows: list) -> bool:
        """Rows that are contiguous views into shared blocks, all of one shape and dtype (``BlockRows`` in a worker)."""
        first = rows[0]
        return isinstance(first, torch.Tensor) and all(
            isinstance(r, torch.Tensor) and r.is_shared() and r.is_contiguous() and r.shape == first.shape
            and r.dtype == first.dtype for r in rows)

    def __len__(self) -> int:
        return len(self.places) // 2

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows as one (n, *row shape) tensor. Copied by numpy, one row at a time: torch's
        stack would wake its intra-op threads, whose spinning took a core from the workers (a 2-core
        loader bench lost a third of its throughput to it)."""
        out = torch.empty((len(self), *self.shape), dtype=self.dtype) if out is None else out
        flat, n = out.numpy().reshape(len(self), -1), flat_size(self.shape)
        bases = [b.numpy() for b in self.bases]
        for i, (b, offset) in enumerate(zip(self.places[::2], self.places[1::2])):
            flat[i] = bases[b][offset:offset + n]
        return out

    def pin_memory(self, device=None) -> torch.Tensor:
        """Called by the DataLoader's pinning thread: the rows gathered into pinned memory."""
        return self.gather(torch.empty((len(self), *self.shape), dtype=self.dtype, pin_memory=True))


def flat_size(shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64))


def sample_label(sample: RawSample) -> torch.Tensor:
    """The corpus label (webdataset cls, image-folder class) for the task loss; -1 when none."""
    return torch.tensor(-1 if sample.label is None else int(sample.label))


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


def collate(samples: list[dict]) -> dict:
    """Samples -> a batch. Stored target rows read in a DataLoader worker stay in their shared
    blocks (``StoredRows``, gathered by ``gather``: ``StreamLoader`` does it); other tensors go
    through torch's ``default_collate``, which in a worker stacks straight into shared memory,
    so the batch crosses to the trainer without a second copy."""
    out = {"key": [s["key"] for s in samples], "view": torch.tensor([s["view"] for s in samples])}
    in_worker = get_worker_info() is not None
    for k in samples[0]:
        if k in out:
            continue
        values = [s[k] for s in samples]
        out[k] = StoredRows(values) if in_worker and StoredRows.holds(values) else default_collate(values)
    return out


def gather(batch: dict) -> dict:
    """A batch from the workers with its stored rows copied into tensors (a no-op for rows pinned or
    collated in this process)."""
    return {k: v.gather() if isinstance(v, StoredRows) else v for k, v in batch.items()}


class StreamLoader(DataLoader):
    """torch's DataLoader over a ``ShardStream``, batches made by ``collate`` and their stored rows
    gathered in this process (``gather``). Every reader of stored targets iterates one of these."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, collate_fn=collate, **kwargs)

    def __iter__(self):
        return map(gather, super().__iter__())
