"""The shard index: written last, planned with by readers, never trusted over a shard's own metadata."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
import zarr

from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.store.inspect import info
from kdcache.store.ops import list_shards
from kdcache.store.shard_index import INDEX_ATTR, INDEX_KEY
from kdcache.store.verify import verify_store

from conftest import run_cli


@pytest.fixture()
def store(tmp_path, vit_store):
    out = str(tmp_path / "s.zarr")
    shutil.copytree(vit_store, out)
    return out


def _index(path: str) -> dict:
    with open(os.path.join(path, INDEX_KEY), "rb") as f:
        return json.loads(f.read())


def _facts(d: dict) -> dict:
    """What info says about the store, without where it learnt it (the index or the shards)."""
    return {k: v for k, v in d.items() if k not in ("shards_from_index", "checked", "root_digest")}


def _shard_bytes_on_disk(path: str, shard: str) -> dict[str, int]:
    """Bytes of each array's files (metadata and chunks), walked with os: not through kdcache or zarr."""
    root = os.path.join(path, "shards", shard)
    out = {}
    for d, _, files in os.walk(root):
        if "zarr.json" in files and d != root:
            meta = json.load(open(os.path.join(d, "zarr.json")))
            if meta.get("node_type") == "array":
                rel = os.path.relpath(d, root)
                out[rel] = sum(os.path.getsize(os.path.join(dd, f)) for dd, _, fs in os.walk(d) for f in fs)
    return out


def test_extraction_writes_an_index_of_every_complete_shard_named_by_the_root(store):
    idx = _index(store)
    root = zarr.open_group(store, mode="r")
    raw = open(os.path.join(store, INDEX_KEY), "rb").read()
    assert root.attrs[INDEX_ATTR] == {"sha256": hashlib.sha256(raw).hexdigest(), "shards": 3}
    assert idx["format"] == 1 and sorted(idx["shards"]) == ["demo-000000", "demo-000001", "demo-000002"]
    for name, e in idx["shards"].items():
        attrs = root[f"shards/{name}"].attrs.asdict()
        assert (e["count"], e["failures"], e["digest"]) == (attrs["count"], len(attrs["failed"]), attrs["digest"])
        on_disk = _shard_bytes_on_disk(store, name)
        assert set(e["nbytes"]) == set(on_disk) and all(e["nbytes"][p] <= on_disk[p] for p in on_disk)
        assert sum(e["nbytes"].values()) > 0.9 * sum(on_disk.values())


def test_readers_plan_from_the_index_without_asking_any_shard(store, monkeypatch):
    truth = info(Store.open(store, index=False))
    asked = []
    real = Store.shard_attrs
    monkeypatch.setattr(Store, "shard_attrs", lambda self, name: asked.append(name) or real(self, name))
    reader = Store.open(store)
    assert reader.complete_shards(["vit"]) == ["demo-000000", "demo-000001", "demo-000002"]
    got = info(reader)
    ls = list_shards(store)
    assert asked == []  # not one shard's metadata read: the index answered
    for k in ("samples", "failed", "shards_complete", "bytes"):
        assert got[k] == truth[k], k
    assert [r["samples"] for r in ls["shards"]] == [8, 8, 8]
    # without the index (a store from before it): the same answers, from every shard
    os.remove(os.path.join(store, INDEX_KEY))
    assert _facts(info(Store.open(store))) == _facts(truth)
    assert set(asked) == {"demo-000000", "demo-000001", "demo-000002"}


@pytest.mark.parametrize("damage", ["count", "garbage", "dotdot", "huge-count", "not-named-by-root"])
def test_a_damaged_index_is_ignored_with_a_warning_and_the_shards_answer(store, damage, caplog):
    truth = info(Store.open(store, index=False))
    path = os.path.join(store, INDEX_KEY)
    idx = _index(store)
    if damage == "count":
        idx["shards"]["demo-000001"]["count"] = 7
    elif damage == "dotdot":
        idx["shards"]["../evil"] = idx["shards"]["demo-000001"]
    elif damage == "huge-count":
        idx["shards"]["demo-000001"]["count"] = 10 ** 30
    raw = b"{not json" if damage == "garbage" else json.dumps(idx).encode()
    with open(path, "wb") as f:
        f.write(raw)
    if damage != "not-named-by-root":  # a tamperer who also rewrote the root's digest of it
        g = zarr.open_group(store, mode="r+")
        g.attrs.put({**g.attrs.asdict(), INDEX_ATTR: {"sha256": hashlib.sha256(raw).hexdigest(), "shards": 3}})
    else:
        with open(path, "ab") as f:
            f.write(b" ")
    with caplog.at_level(logging.WARNING, logger="kdcache.store"):
        got = info(Store.open(store))
    if damage == "count":  # valid-looking, the root's digest of it rewritten: the entry no longer hashes to its binding
        assert _facts(got) == _facts(truth)  # so it is ignored from the start: the shard's own metadata answers
        assert "1 entry (first: shard demo-000001) do not hash to the binding they record" in caplog.text
        assert Store.open(store).shard_summary("demo-000001")["count"] == 8
        report = verify_store(store)
        assert len(report.problems) == 1 and "do not hash to the binding" in report.problems[0]
    else:
        assert _facts(got) == _facts(truth)  # ignored as a whole: every shard answered
        assert "ignored: every shard's own metadata is read instead" in caplog.text
        assert len(verify_store(store).problems) == 1
    # kdcache store stats rewrites it from the shards
    run_cli("store", "stats", store)
    assert _facts(info(Store.open(store))) == _facts(truth) and verify_store(store).problems == []


def test_a_store_without_an_index_trains_and_stats_adds_it(tmp_path, store, corpus):
    os.remove(os.path.join(store, INDEX_KEY))
    g = zarr.open_group(store, mode="r+")
    g.attrs.put({k: v for k, v in g.attrs.asdict().items() if k != INDEX_ATTR})
    p = run_cli("train", "--store", store, "--data", corpus, "--student", "vit_tiny_patch16_224,img_size=32,depth=1",
                "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--workers", "0", "--head-hidden", "8",
                "--no-progress")
    assert p.returncode == 0 and os.path.exists(tmp_path / "run" / "checkpoints" / "last")
    assert not os.path.exists(os.path.join(store, INDEX_KEY))  # readers never write
    run_cli("store", "stats", store)
    assert sorted(_index(store)["shards"]) == ["demo-000000", "demo-000001", "demo-000002"]


def test_several_ranks_end_with_one_index_of_all_their_shards(tmp_path, corpus, vit_spec):
    out = str(tmp_path / "r.zarr")
    for rank in (1, 0, 2):  # rank 0 in the middle: the ranks after it merge their shards into its index
        extract(corpus, out, [vit_spec], ExtractOptions(views=2, progress=False, workers=0, rank=rank, world_size=3))
    assert sorted(_index(out)["shards"]) == ["demo-000000", "demo-000001", "demo-000002"]
    assert verify_store(out).problems == []


def test_on_s3_start_up_requests_do_not_grow_with_the_shards(s3, tmp_path, many_shards, vit_spec):
    """Requests to the loopback server for planning commands, with and without the index."""
    bucket = s3.bucket()
    url = f"s3://{bucket}/s.zarr"
    local = str(tmp_path / "s.zarr")
    extract(many_shards, local, [vit_spec], ExtractOptions(views=1, progress=False, workers=0))
    s3.fs.put(local, f"{bucket}/s.zarr", recursive=True)

    def requests(fn) -> int:
        s3.server.reset()
        fn()
        return s3.server.requests()

    def plan():
        store = Store.open(url)
        store.complete_shards(["vit"])
        info(store)

    with_index = requests(plan)
    s3.fs.rm(f"{bucket}/s.zarr/{INDEX_KEY}")
    without = requests(plan)
    shards = len(Store.open(url).shard_names())
    assert shards == 6
    # open (root metadata, the shards listing) + the index: a fixed few, whatever the shard count
    assert with_index <= 6, with_index
    assert without >= with_index + shards  # one or more requests per shard without it


def test_on_s3_opening_a_shard_costs_one_request_per_metadata_and_block(s3, tmp_path, many_shards, vit_spec):
    """What opening a shard for reading costs on object storage: each array's metadata and each of
    its blocks in one request (s3fs would ask each whole object's size first: twice as many)."""
    bucket = s3.bucket()
    url = f"s3://{bucket}/k.zarr"
    local = str(tmp_path / "k.zarr")
    extract(many_shards, local, [vit_spec], ExtractOptions(views=2, progress=False, workers=0))
    s3.fs.put(local, f"{bucket}/k.zarr", recursive=True)
    store = Store.open(url)
    shard = store.shard_names()[0]
    store.shard_attrs(shard)  # the shard's attributes are read once per shard for everything else
    s3.server.reset()
    keys, views = store.keys(shard), store.views(shard)
    served = s3.server.requests()
    group = zarr.open_group(local, mode="r")[f"shards/{shard}"]
    np.testing.assert_array_equal(keys, np.asarray(group["keys"][:].tolist(), dtype=str))
    np.testing.assert_array_equal(views, group["views"][:])
    assert group["views"].shards[0] > len(views) > 1  # a partial shard
    assert served == 4, served  # for each of the two arrays: its metadata and its one block, no HEAD before either
    teacher = next(iter(store.meta.teachers))
    s3.server.reset()
    blocks = list(store.read_blocks(shard, f"{teacher}/patch"))
    # a feature block the same way, each of its K=2 views a Zarr shard of its own (format 2)
    assert len(blocks) == 1 and s3.server.requests() == 3
    np.testing.assert_array_equal(blocks[0], group[f"{teacher}/patch"][:])
    s3.server.reset()
    one_view = list(store.read_blocks(shard, f"{teacher}/patch", view=1))
    assert s3.server.requests() == 1  # that view's one Zarr shard, half the bytes (the reader keeps the array open)
    np.testing.assert_array_equal(one_view[0], group[f"{teacher}/patch"][:, 1])
