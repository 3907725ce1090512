"""data.partition: every shard exactly once per epoch across ranks and workers."""
from __future__ import annotations

import pytest

from kdcache.data.partition import epoch_streams, rank_and_world
from kdcache.store import KdcacheError


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_every_shard_once_per_epoch(world, workers):
    shards = [f"s{i}" for i in range(11)]
    for epoch in range(3):
        streams = epoch_streams(shards, seed=5, epoch=epoch, world=world, workers=workers)
        flat = [s for rank in streams for worker in rank for s in worker]
        assert sorted(flat) == sorted(shards) and len(streams) == world and all(len(r) == workers for r in streams)
    assert epoch_streams(shards, seed=5, epoch=0, world=1, workers=1) != epoch_streams(shards, seed=5, epoch=1, world=1, workers=1)


def test_rank_and_world(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world() == (1, 4) and rank_and_world(2, 3) == (2, 3)
    with pytest.raises(KdcacheError, match="--rank 3 / --world-size 3"):
        rank_and_world(3, 3)
