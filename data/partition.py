"""Who does which shard: the one place for rank, world and DataLoader-worker arithmetic.

Extraction, quantization and training all split shards the same way: ranks take
``order[rank::world]`` with no communication, and each DataLoader worker of a rank takes
``mine[worker::workers]``. ``steps_per_epoch`` in training counts from the very same split.
"""
from __future__ import annotations

import os
import random
from typing import Sequence, TypeVar

from kdcache.errors import KdcacheError

T = TypeVar("T")


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
    return list(items)[rank::world]


def worker_share(items: Sequence[T], worker: int, workers: int) -> list[T]:
    return list(items)[worker::max(1, workers)]


def current_worker() -> tuple[int, int]:
    """(worker id, workers) inside a DataLoader worker; (0, 1) in the main process."""
    from torch.utils.data import get_worker_info
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def epoch_order(shards: Sequence[str], *, seed: int, epoch: int) -> list[str]:
    """The shard order of an epoch: shuffled by (seed, epoch), the same on every rank."""
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def epoch_streams(shards: Sequence[str], *, seed: int, epoch: int, world: int, workers: int) -> list[list[list[str]]]:
    """streams[rank][worker]: the shards each DataLoader worker of each rank reads this epoch."""
    order = epoch_order(shards, seed=seed, epoch=epoch)
    return [[worker_share(rank_share(order, r, world), w, workers) for w in range(max(1, workers))] for r in range(world)]
