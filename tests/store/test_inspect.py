"""kdcache info and verify: numbers from the store, corruption and corpus mismatches found."""
from __future__ import annotations

import logging

import json
import os
import shutil
import tarfile

import numpy as np
import zarr
from conftest import run_cli

from kdcache.extract.options import ExtractOptions

from kdcache.extract.run import extract
from helpers import verify_store
from kdcache.store import Store
from kdcache.store.inspect import info


def _store(tmp_path, corpus, vit_spec, **kw):
    out = str(tmp_path / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(progress=False, workers=0, views=2, **kw))
    return out


def test_info_reports_counts_and_bytes(tmp_path, corpus, vit_spec):
    out = _store(tmp_path, corpus, vit_spec)
    d = info(Store.open(out))
    assert (d["shards_complete"], d["shards_incomplete"], d["samples"], d["failed"], d["views"]) == (3, 0, 24, 0, 2)
    t = d["teachers"]["vit"]
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs
                  if "/shards/" in r and ("/vit/cls" in r or "/vit/patch" in r))  # chunks and array metadata
    assert t["bytes"] == on_disk and t["bytes_per_sample"] == on_disk / 24
    assert t["raw_bytes_per_sample"] == 2 * (4 + 1) * 192 * 2 and t["dim"] == 192 and t["grid"] == [2, 2]
    p = run_cli("info", out, "--json")
    assert json.loads(p.stdout)["samples"] == 24
    text = run_cli("info", out).stdout
    assert "3 complete, 0 incomplete" in text and "vit_tiny_patch16_224" in text and "float16/auto" in text


def test_verify_passes_then_finds_silent_corruption(tmp_path, corpus, vit_spec):
    out = _store(tmp_path, corpus, vit_spec)
    report = verify_store(out, corpus)
    assert report.problems == [] and (report.shards_checked, report.shards_incomplete, report.samples) == (3, 0, 24)
    a = zarr.open_array(os.path.join(out, "shards/demo-000001/vit/patch"), mode="r+")
    a[3, 1, 0, 0] = a[3, 1, 0, 0] + 1
    problems = verify_store(out).problems  # found as a reader finds it: the block's CRC-32
    assert problems == ["shard demo-000001: vit/patch: block 0 view 1 does not match the checksum written with it "
                        "(corrupt or missing chunk)"]
    p = run_cli("verify", out, check=False)
    assert p.returncode == 1 and "MISMATCH shard demo-000001: vit/patch: block 0 view 1 does not match" in p.stdout


def test_verify_with_data_finds_key_mismatch(tmp_path, corpus, vit_spec):
    out = _store(tmp_path, corpus, vit_spec)
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    src = os.path.join(corpus, "demo-000002.tar")
    dst = other / "demo-000002.tar"
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        members = tin.getmembers()
        dropped = members[4].name.rsplit(".", 1)[0]  # the third sample
        for m in members:
            if not m.name.startswith(dropped + "."):
                tout.addfile(m, tin.extractfile(m))
    problems = verify_store(out, str(other)).problems
    assert len(problems) == 1 and problems[0].startswith("shard demo-000002: key 2 is ")


def test_incomplete_shard_is_ignored_then_redone(tmp_path, corpus, vit_spec, caplog):
    out = _store(tmp_path, corpus, vit_spec)
    before = np.asarray(zarr.open_group(out)["shards/demo-000000/vit/patch"][:])
    g = zarr.open_group(out, mode="r+")["shards/demo-000000"]
    g.attrs.put({**g.attrs.asdict(), "complete": False})
    store = Store.open(out, index=False)  # every shard's own metadata
    assert store.complete_shards() == ["demo-000001", "demo-000002"]
    assert info(store)["shards_incomplete"] == 1
    # a reader plans with the shard index, now stale; reading the shard's metadata overrules it, with a warning
    reader = Store.open(out)
    assert reader.complete_shards() == ["demo-000000", "demo-000001", "demo-000002"]
    with caplog.at_level(logging.WARNING, logger="kdcache.store"):
        assert reader.shard_attrs("demo-000000")["complete"] is False
    assert "shard demo-000000 disagrees with the shard's own metadata" in caplog.text
    assert reader.complete_shards() == ["demo-000001", "demo-000002"]
    s = extract(corpus, out, [vit_spec], ExtractOptions(progress=False, workers=0, views=2))
    assert (s.shards_written, s.shards_skipped) == (1, 2)
    np.testing.assert_array_equal(zarr.open_group(out)["shards/demo-000000/vit/patch"][:], before)
    assert Store.open(out).complete_shards() == ["demo-000000", "demo-000001", "demo-000002"]  # the index rewritten
