"""kdcache store copy / merge / subset / drop-teacher / stats / ls."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from helpers import assert_same_store, cli_call, one_error_line, store_arrays

from helpers import verify_store
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store
from kdcache.store import ops
from kdcache.store.layout import ArrayDigest


def test_copy_to_s3_and_back_is_identical_and_resumes(tmp_path, two_teachers, s3, monkeypatch, capsys):
    remote = f"s3://{s3.bucket()}/copy.zarr"
    code, out, err = cli_call(monkeypatch, capsys, "store", "copy", two_teachers, remote, "--no-progress")
    assert code == 0 and json.loads(out)["shards_copied"] == 3, err
    back = str(tmp_path / "back.zarr")
    real, calls = ops._copy_shard, []

    def flaky(src, dst, name):  # the connection drops during the second shard
        calls.append(name)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real(src, dst, name)
    monkeypatch.setattr(ops, "_copy_shard", flaky)
    with pytest.raises(OSError):
        ops.copy_stores([remote], back, progress=False)
    monkeypatch.setattr(ops, "_copy_shard", real)
    r = ops.copy_stores([remote], back, progress=False)
    assert (r["shards_copied"], r["shards_already_there"]) == (2, 1)
    assert_same_store(two_teachers, back)
    assert Store.open(back).read_stats("vit", "patch") is not None and verify_store(back).problems == []


def test_merge_of_rank_stores_equals_one_store_and_refuses_a_conflict(tmp_path, corpus, vit_spec, monkeypatch, capsys):
    ref, a, b = (str(tmp_path / n) for n in ("ref.zarr", "a.zarr", "b.zarr"))
    extract(corpus, ref, [vit_spec], ExtractOptions(progress=False, workers=0))
    extract(corpus, a, [vit_spec], ExtractOptions(progress=False, workers=0, rank=0, world_size=2))
    extract(corpus, b, [vit_spec], ExtractOptions(progress=False, workers=0, rank=1, world_size=2))
    code, out, err = cli_call(monkeypatch, capsys, "store", "merge", a, b, ref, "--out", str(tmp_path / "m.zarr"), "--no-progress")
    assert code == 0 and json.loads(out)["shards_copied"] == 3, err
    assert_same_store(ref, str(tmp_path / "m.zarr"))
    # b's demo-000001 now holds other data (and a digest that matches it): a conflict with ref's
    g = zarr.open_group(b, mode="r+")["shards/demo-000001"]
    cls = g["vit/cls"]
    cls[0] = cls[0] + 1
    d = ArrayDigest()
    d.update(np.asarray(cls[:]))
    from kdcache.store.layout import sealed
    g.attrs.put(sealed("demo-000001", {**g.attrs.asdict(), "digest": {**g.attrs["digest"], "vit/cls": d.hexdigest()}}))
    code, _, err = cli_call(monkeypatch, capsys, "store", "merge", ref, b, "--out", str(tmp_path / "c.zarr"), "--no-progress")
    assert code == 2 and "shard demo-000001: in" in one_error_line(err) and "different data" in err
    assert not Store.exists(str(tmp_path / "c.zarr"))


def test_subset_trains_against_the_full_corpus(tmp_path, two_teachers, corpus, monkeypatch, capsys):
    out = str(tmp_path / "sub.zarr")
    code, res, err = cli_call(monkeypatch, capsys, "store", "subset", two_teachers, "--shards", "demo-00000[02]", "--out", out,
                              "--no-progress")
    assert code == 0 and json.loads(res)["shards_copied"] == 2
    assert Store.open(out).complete_shards() == ["demo-000000", "demo-000002"]
    code, res, err = cli_call(monkeypatch, capsys, "train", "--store", out, "--data", corpus, "--student",
                              "vit_tiny_patch16_224,img_size=32,depth=1", "--out", str(tmp_path / "run"), "--epochs", "1",
                              "--batch-size", "4", "--workers", "0", "--head-hidden", "16", "--amp", "none", "--no-progress")
    assert code == 0 and json.loads(res)["steps"] == 4, err


def test_drop_teacher_stats_and_ls(tmp_path, two_teachers, corpus, monkeypatch, capsys):
    s = str(tmp_path / "s.zarr")
    shutil.copytree(two_teachers, s)
    code, out, _ = cli_call(monkeypatch, capsys, "store", "drop-teacher", s, "cnn")
    assert code == 0 and json.loads(out)["shards"] == 3
    store = Store.open(s)
    assert list(store.meta.teachers) == ["vit"] and not [k for k in store_arrays(s) if "/cnn/" in k]
    assert verify_store(s, corpus).problems == [] and store.read_stats("cnn", "patch") is None
    shutil.rmtree(f"{s}/stats")
    code, out, _ = cli_call(monkeypatch, capsys, "store", "stats", s)
    assert code == 0 and json.loads(out)["tokens"]["vit/patch"] > 0 and Store.open(s).read_stats("vit", "cls") is not None
    Store.open(s, writable=True).leases("someone-else").acquire("demo-000001")
    code, out, _ = cli_call(monkeypatch, capsys, "store", "ls", s, "--json")
    rows = {r["shard"]: r for r in json.loads(out)["shards"]}
    assert code == 0 and [r["state"] for r in rows.values()] == ["complete"] * 3 and rows["demo-000000"]["samples"] == 8
    assert rows["demo-000001"]["lease"]["owner"] == "someone-else" and rows["demo-000000"]["lease"] is None
    code, out, _ = cli_call(monkeypatch, capsys, "store", "ls", s)
    assert "demo-000001" in out and "someone-" in out
    code, _, err = cli_call(monkeypatch, capsys, "store", "drop-teacher", s, "vit")
    assert code == 2 and "only teacher" in one_error_line(err)


def test_copy_converts_between_formats_with_the_same_rows_and_digests(tmp_path, vit_store, monkeypatch, capsys):
    """`store copy --format`: a format-3 store down to format 1 (a block holds every view, no
    ``origin``) and back up to 2: every array's rows and digests as the source's (plain zarr), the
    layout and checksums of the destination's format, verify clean, and one view read alone equal to
    plain zarr's slice."""
    old, new = str(tmp_path / "f1.zarr"), str(tmp_path / "f2.zarr")
    for src, dst, fmt in ((vit_store, old, "1"), (old, new, "2")):
        code, out, err = cli_call(monkeypatch, capsys, "store", "copy", src, dst, "--format", fmt, "--no-progress")
        assert code == 0 and json.loads(out)["shards_copied"] == 3, err
    k = Store.open(vit_store).meta.views
    assert k == 2 and Store.open(vit_store).meta.format == 4
    source = {name: a for name, a in store_arrays(vit_store).items() if not name.endswith("/origin")}
    for url, fmt in ((old, 1), (new, 2)):
        got = store_arrays(url)
        assert sorted(got) == sorted(source)  # origin left out below format 3
        for name in got:
            np.testing.assert_array_equal(got[name], source[name], err_msg=name)
        s = Store.open(url)
        assert s.meta.format == fmt and verify_store(url).problems == []
        g = zarr.open_group(url, mode="r")
        for name in s.complete_shards():
            attrs = s.shard_attrs(name)
            want = dict(Store.open(vit_store).shard_attrs(name)["digest"])
            want.pop("origin")
            assert attrs["digest"] == want and "block" not in attrs
            for path in ("vit/cls", "vit/patch"):
                a = g[f"shards/{name}/{path}"]
                assert a.shards[1] == (k if fmt == 1 else 1)
                assert len(attrs["block_crc32"][path]) == (1 if fmt == 1 else k)  # one block per shard here
                np.testing.assert_array_equal(next(s.read_blocks(name, path, view=1)), a[:, 1])
    code, out, err = cli_call(monkeypatch, capsys, "store", "copy", vit_store, old, "--no-progress")
    assert code == 2 and "format differs" in one_error_line(err)  # an existing destination keeps its format
