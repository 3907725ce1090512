"""``--view-choice all`` (repeated augmentation): every stored view of an image leaves as its own
sample each epoch, cut from one decode, its targets from one block read; the schedule counts
them; an online run or a derived view is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from helpers import store_stream

from kdcache.store import Store
from kdcache.train.config import ConfigError, TrainConfig


def _epoch(store_url, corpus, choice, epoch):
    return list(store_stream(store_url, corpus, ("vit/cls", "vit/patch"), view_choice=choice, window=8, epoch=epoch))


def test_every_stored_view_leaves_once_an_epoch_with_its_own_pixels_and_rows(vit_store, corpus):
    store = Store.open(vit_store)
    k = store.meta.view_policy.views
    every = _epoch(vit_store, corpus, "all", 0)
    by = {(x["key"], x["view"]): x for x in every}
    assert k == 2 and len(every) == len(by) == 24 * k  # each (image, view) exactly once
    for shard in store.complete_shards():  # the targets are the stored rows, read with plain zarr
        keys = store.keys(shard).tolist()
        patch = np.asarray(store.root[f"shards/{shard}/vit/patch"][:])
        for row, key in enumerate(keys):
            for v in range(k):
                np.testing.assert_array_equal(by[(key, v)]["vit/patch"].numpy(), patch[row, v])
    # one view at a time (--view-choice epoch takes each view of each image once over K epochs):
    # the same pixels (this store decodes at full size) and the same rows
    seen = set()
    for epoch in range(k):
        for x in _epoch(vit_store, corpus, "epoch", epoch):
            y = by[(x["key"], x["view"])]
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["vit/cls"], y["vit/cls"])
            seen.add((x["key"], x["view"]))
    assert seen == set(by)


def test_a_run_with_every_view_takes_k_times_the_steps(tmp_path, vit_store, corpus):
    base = ["train", "--store", vit_store, "--data", corpus, "--student", "resnet18,img_size=32", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--head-hidden", "8", "--no-progress"]
    one = json.loads(run_cli(*base, "--out", str(tmp_path / "one")).stdout)
    every = json.loads(run_cli(*base, "--out", str(tmp_path / "every"), "--view-choice", "all").stdout)
    assert one["steps"] == 6 and every["steps"] == 12  # 24 images, batches of 4; K=2 samples per image


def test_every_view_is_refused_online(tmp_path, corpus):
    with pytest.raises(ConfigError, match="--view-choice all .* --online draws views of its own"):
        TrainConfig(store="", data=corpus, student="resnet18", out=str(tmp_path / "r"), online=True, teachers=("x=resnet18",),
                    view_choice="all")
