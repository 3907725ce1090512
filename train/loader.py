"""The training loader: corpus shard i and store shard i streamed together.

Per epoch the shard order is shuffled (seeded by seed and epoch; the same on every rank, which
then takes ``order[rank::world]``, and each DataLoader worker ``[worker::workers]``). Within
a shard the store arrays are read one Zarr block at a time (a few large requests, never a
random read per sample) while the corpus tar streams alongside; keys must match in order
(samples recorded as failed at extraction are skipped). Each sample takes one of its K stored
views, its crop is replayed from the stored parameters (so student and teacher saw the same
pixels), resized to the student's input, optionally colour-jittered (student only). Targets
leave the workers as stored bytes: fp16, bf16 bits (int16), uint8 codes; ``train.targets``
turns them into floats on the device.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from kdcache.data.corpus import Corpus
from kdcache.data.decode import BadImage, DecodeOptions, decode_sample
from kdcache.data.partition import current_worker, epoch_streams
from kdcache.data.views import replay_view
from kdcache.data.walk import align
from kdcache.store import KdcacheError, Store, StoreError
from kdcache.store.dtypes import stored_to_tensor
from kdcache.store.errors import one_line

VIEW_CHOICES = ("epoch", "random", "first", "augmented")


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

    def __post_init__(self):
        if self.view_choice not in VIEW_CHOICES:
            raise LoaderError(f"view_choice {self.view_choice!r}: expected one of {', '.join(VIEW_CHOICES)}")


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
    ``DistillStream`` (cached targets) and ``train.online.OnlineStream`` (live teachers) share
    this order, so the same seed gives the same batches from either. A subclass defines
    ``_shard(name, epoch)``: the samples of one shard, as dicts.

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
        for shard in mine:
            for sample in self._shard(shard, epoch):
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


class DistillStream(ShardStream):
    """Yields dicts: key, image (3, H, W) uint8, view (int), and the stored target rows."""

    def __init__(self, corpus: Corpus, spec: LoaderSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        super().__init__(corpus, spec, epoch=epoch, rank=rank, world=world)
        self._store = None

    def __iter__(self):
        if self._store is None:
            self._store = Store.open(self.spec.store_url)
        yield from self._epoch_samples(self.epoch)

    def _shard(self, name: str, epoch: int):
        """The samples of one shard; a corrupt shard stops the run, or with ``skip_corrupt`` ends
        here and is recorded (shard, array, reason, samples not delivered) in ``skip_log``."""
        store, spec = self._store, self.spec
        row, attrs = 0, {}
        try:
            attrs = store.shard_attrs(name) or {}
            if attrs.get("complete") is not True:
                raise LoaderError(f"{spec.store_url}: shard {name} is not complete")
            keys = store.keys(name).tolist()
            views = store.views(name)
            arrays = {p: store.array(name, p) for p in spec.target_paths}
            block_rows = store.block_rows(name, spec.target_paths[0])
            blocks: dict[str, np.ndarray] = {}
            block_start = -1
            k = views.shape[1]
            for row, s in align(self.corpus, self.corpus.shard(name), keys, attrs.get("failed", [])):
                if block_start < 0 or row >= block_start + block_rows:  # one Zarr block per array: a few large reads
                    block_start = (row // block_rows) * block_rows
                    blocks = {p: store.read_block(name, p, row // block_rows, attrs=attrs, array=a, verify=spec.verify)
                              for p, a in arrays.items()}
                v = pick_view(spec.view_choice, k, key=s.key, epoch=epoch, seed=spec.seed)
                try:
                    rgb = decode_sample(s, spec.decode)
                except BadImage as e:
                    raise LoaderError(f"shard {name}: sample {s.key!r} was extracted but now fails to decode: {e}") from None
                image = replay_view(torch.from_numpy(rgb).permute(2, 0, 1), views[row, v], spec.input_size, spec.interpolation)
                out = {"key": s.key, "image": image, "view": v, "label": sample_label(s)}
                for p, b in blocks.items():
                    out[p] = stored_to_tensor(b[row - block_start, v])
                yield out
        except StoreError as e:
            if not spec.skip_log:
                raise
            count = attrs.get("count", 0)
            record_skip(spec.skip_log, {"epoch": epoch, "shard": name, "error": one_line(e),
                                        "samples_skipped": max(0, count - row) if isinstance(count, int) else 0})


def sample_label(sample) -> torch.Tensor:
    """The corpus label (webdataset cls, image-folder class) for the task loss; -1 when none."""
    return torch.tensor(-1 if sample.label is None else int(sample.label))


def record_skip(path: str, record: dict) -> None:
    """One JSON line per skipped shard; O_APPEND keeps lines whole across worker processes."""
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
    out = {"key": [s["key"] for s in samples], "view": torch.tensor([s["view"] for s in samples])}
    for k in samples[0]:
        if k not in out:
            out[k] = torch.stack([s[k] for s in samples])
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Pinned host tensors -> device, non_blocking (the copy overlaps compute on CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
