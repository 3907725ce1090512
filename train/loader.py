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
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdcache.extract.corpus import Corpus, ShardReadError
from kdcache.extract.decode import BadImage, DecodeOptions, decode_sample
from kdcache.extract.views import replay_view
from kdcache.store import KdcacheError, Store

VIEW_CHOICES = ("epoch", "random", "first")


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
    decode: DecodeOptions = DecodeOptions()  # as at extraction (the store's corpus.decode)


def epoch_shards(shards, *, seed: int, epoch: int, rank: int, world: int) -> list[str]:
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order[rank::world]


def pick_view(choice: str, k: int, *, key: str, epoch: int, seed: int) -> int:
    if choice == "first" or k == 1:
        return 0
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little")
    if choice == "epoch":  # every view once per K epochs, from a per-key offset
        return (epoch + h) % k
    return random.Random(f"{seed}/{epoch}/{key}").randrange(k)


class DistillStream(IterableDataset):
    """Yields dicts: key, image (3, H, W) uint8, view (int), and the stored target rows."""

    def __init__(self, corpus: Corpus, spec: LoaderSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        self.corpus, self.spec, self.epoch, self.rank, self.world = corpus, spec, epoch, rank, world
        self._store = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self._store is None:
            self._store = Store.open(self.spec.store_url)
        mine = epoch_shards(self.spec.shards, seed=self.spec.seed, epoch=self.epoch, rank=self.rank, world=self.world)[wid::nw]
        rng = random.Random(f"{self.spec.seed}/{self.epoch}/{self.rank}/{wid}")
        jitter = _color_jitter(self.spec.color_jitter)
        buffer = []
        for shard in mine:
            for sample in self._shard(shard):
                if jitter is not None:
                    torch.manual_seed(rng.getrandbits(63))
                    sample["image"] = jitter(sample["image"])
                if len(buffer) < self.spec.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _shard(self, name: str):
        store, spec = self._store, self.spec
        attrs = store.shard_attrs(name) or {}
        if attrs.get("complete") is not True:
            raise LoaderError(f"{spec.store_url}: shard {name} is not complete")
        keys = store.keys(name).tolist()
        failed = {f["key"] for f in attrs.get("failed", [])}
        views = store.views(name)
        arrays = {p: store.array(name, p) for p in spec.target_paths}
        block_rows = _block_rows(arrays)
        blocks: dict[str, np.ndarray] = {}
        block_start = -1
        i = 0
        k = views.shape[1]
        for s in self.corpus.samples(self.corpus.shard(name)):
            if isinstance(s, ShardReadError):
                if "(tar)" in failed:
                    break
                raise LoaderError(f"shard {name}: {s.error}")
            if s.key in failed:
                continue
            if i >= len(keys) or s.key != keys[i]:
                want = keys[i] if i < len(keys) else "(end of store shard)"
                raise LoaderError(f"shard {name}: corpus key {s.key!r} where the store has {want!r} at row {i}: "
                                  f"the store was not extracted from this corpus")
            if i >= block_start + block_rows or block_start < 0:
                block_start = (i // block_rows) * block_rows
                blocks = {p: np.asarray(a[block_start:block_start + block_rows]) for p, a in arrays.items()}
            v = pick_view(spec.view_choice, k, key=s.key, epoch=self.epoch, seed=spec.seed)
            try:
                rgb = decode_sample(s, spec.decode)
            except BadImage as e:
                raise LoaderError(f"shard {name}: sample {s.key!r} was extracted but now fails to decode: {e}") from None
            image = replay_view(torch.from_numpy(rgb).permute(2, 0, 1), views[i, v], spec.input_size, spec.interpolation)
            out = {"key": s.key, "image": image, "view": v}
            for p, b in blocks.items():
                out[p] = _as_tensor(b[i - block_start, v])
            yield out
            i += 1
        if i != len(keys):
            raise LoaderError(f"shard {name}: the corpus ended after {i} samples, the store has {len(keys)}")


def _block_rows(arrays) -> int:
    a = next(iter(arrays.values()))
    return int(a.shards[0] if a.shards else a.chunks[0])


def _as_tensor(row: np.ndarray) -> torch.Tensor:
    if row.dtype == np.uint16:  # bfloat16 bits: int16 keeps them, the device views them as bf16
        return torch.from_numpy(np.ascontiguousarray(row).view(np.int16))
    return torch.from_numpy(np.ascontiguousarray(row))


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
