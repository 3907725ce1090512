"""kdcache bench formats: every format holds exactly the store's features, every loader delivers
every sample, and the command prints every column."""
from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
from helpers import cli_call

from kdcache.bench.formats import (FileSamples, StoreRows, _load_npy, _load_torch, _tar_dataset, read_features,
                                   write_npy_files, write_store, write_tars, write_torch_files)
from kdcache.bench.peers import litdata_dataset, mds_dataset, write_litdata, write_mds
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.store import Store


@pytest.fixture(scope="module")
def k8_store(tmp_path_factory, corpus, vit_spec):
    out = str(tmp_path_factory.mktemp("formats") / "s.zarr")  # 24 x 8 x 4 = 768 patch tokens: enough to quantize
    extract(corpus, out, [vit_spec], ExtractOptions(views=8, progress=False, workers=0))
    return out


def _reference(url):
    """Independently of bench_formats: every sample's (cls, patch) by key, through plain zarr."""
    import zarr
    root = zarr.open_group(url, mode="r")
    out = {}
    for name, g in root["shards"].groups():
        for i, key in enumerate(g["keys"][:].tolist()):
            out[key] = (g["vit/cls"][i], g["vit/patch"][i])
    return out


def test_every_format_holds_exactly_the_store_s_features(tmp_path, k8_store):
    ref = _reference(k8_store)
    feats = read_features(k8_store)
    assert feats.samples == len(ref) == 24
    write_store(feats, str(tmp_path / "copy.zarr"))
    got = {}
    for s in StoreRows(str(tmp_path / "copy.zarr"), "vit"):
        got[len(got)] = s
    assert len(got) == 24  # every sample once (shuffled: matched by content below)
    cls_rows = sorted(tuple(v["cls"].flatten()[:4].tolist()) for v in got.values())
    assert cls_rows == sorted(tuple(c.flatten()[:4].tolist()) for c, _ in ref.values())
    import os
    for root, writer in ((tmp_path / "pt", write_torch_files), (tmp_path / "npy", write_npy_files)):
        files = writer(feats, str(root))
        assert len(files) == 24
        for path in files:  # ROOT/SHARD/KEY.EXT
            key = os.path.relpath(path, root).split("/", 1)[1].rsplit(".", 1)[0]
            cls, patch = ref[key]
            if path.endswith(".pt"):
                t = _load_torch(path)
                np.testing.assert_array_equal(t["cls"].numpy(), cls)
                np.testing.assert_array_equal(t["patch"].numpy(), patch)
            else:
                t = _load_npy(path)["tokens"].numpy()
                np.testing.assert_array_equal(t[:, 0], cls)
                np.testing.assert_array_equal(t[:, 1:], patch)
    write_tars(feats, str(tmp_path / "tars"))
    import safetensors.torch
    import webdataset as wds
    n = 0
    for sample in wds.WebDataset(sorted(str(p) for p in (tmp_path / "tars").glob("*.tar")), shardshuffle=False):
        t = safetensors.torch.load(sample["safetensors"])
        cls, patch = ref[sample["__key__"]]
        np.testing.assert_array_equal(t["cls"].numpy(), cls)
        np.testing.assert_array_equal(t["patch"].numpy(), patch)
        n += 1
    assert n == 24
    assert sum(1 for _ in _tar_dataset(str(tmp_path / "tars"))) == 24
    assert len(FileSamples([p for p in write_npy_files(feats, str(tmp_path / "npy2"))], _load_npy)) == 24
    # the peers, read back with their own datasets: every sample once, exactly the store's features
    write_mds(feats, str(tmp_path / "mds"))
    write_litdata(feats, str(tmp_path / "lit"))
    for ds in (mds_dataset(str(tmp_path / "mds"), 8)(), litdata_dataset(str(tmp_path / "lit"))()):
        seen = set()
        for sample in ds:
            cls, patch = ref[sample["key"]]
            np.testing.assert_array_equal(np.asarray(sample["cls"]), cls)
            np.testing.assert_array_equal(np.asarray(sample["patch"]), patch)
            seen.add(sample["key"])
        assert len(seen) == 24


def test_bench_formats_prints_every_format_and_column(k8_store, monkeypatch, capsys):
    start_method = multiprocessing.get_start_method(allow_none=True)
    code, out, err = cli_call(monkeypatch, capsys, "bench", "formats", "--store", k8_store, "--repeat", "1",
                              "--quantize", "pq", "--fraction", "16", "--workers", "0", "--batch-size", "8")
    assert code == 0, err
    # LitData's optimize sets the start method to spawn for the whole process; the bench puts it back
    assert multiprocessing.get_start_method(allow_none=True) == start_method
    assert ("| format | KiB/sample on disk | fixed KiB (codebooks, metadata) | write MB/s (fp16 features) | first batch s | "
            "read samples/s (after the first batch) |") in out
    for row in ("| kdcache store, fp16 |", "| kdcache store, fp16, codec none |", "| kdcache store, pq:M=24 |", "| safetensors in webdataset tars |",
                "| torch file per sample (weights_only) |", "| .npy file per sample |", "| mosaic streaming (MDS) |",
                "| litdata |"):
        assert row in out
    assert "kdcache fp16 store / tars: read" in out and "smaller than the raw fp16 features" in out
    assert "(the fastest peer): read" in out and "kdcache store, pq:M=24 / " in out
    code, out, err = cli_call(monkeypatch, capsys, "bench", "formats", "--store", k8_store, "--repeat", "1", "--json",
                              "--quantize", "none", "--workers", "0", "--batch-size", "8")
    assert code == 0, err
    r = json.loads(out)
    assert set(r["formats"]) == {"kdcache store, fp16", "kdcache store, fp16, codec none", "safetensors in webdataset tars", "torch file per sample (weights_only)",
                                 ".npy file per sample", "mosaic streaming (MDS)", "litdata"}
    assert r["samples"] == 24 and r["views"] == 8 and r["fastest_peer"] in ("mosaic streaming (MDS)", "litdata")
    for v in r["formats"].values():
        assert v["bytes_per_sample"] > 0 and v["read_samples_s"]["median"] > 0 and v["write_mb_s"]["median"] > 0
        assert v["first_batch_s"]["median"] > 0
    # every read side delivered all 24 samples in every run: 8 in the first batch, 16 timed after it
    assert all(n == 16 for n in r["read"]["items"].values())
    code, out, err = cli_call(monkeypatch, capsys, "bench", "formats", "--store", k8_store, "--repeat", "1", "--json",
                              "--quantize", "none", "--workers", "0", "--no-peers")
    assert code == 0 and "litdata" not in json.loads(out)["formats"]
    fp16 = r["fp16_feature_bytes_per_sample"]
    meta = Store.open(k8_store).meta.teachers["vit"]
    assert fp16 == 8 * (meta.tokens + 1) * meta.dim * 2
    assert r["formats"][".npy file per sample"]["bytes_per_sample"] == pytest.approx(fp16, rel=0.05)  # raw + a header


def test_the_store_and_the_peers_holding_every_views_jpeg_are_compared_at_equal_content(tmp_path, corpus, vit_spec,
                                                                                        monkeypatch, capsys):
    from kdcache.bench.formats import PIXEL_ROWS, read_features
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    url = str(tmp_path / "px.zarr")
    extract(corpus, url, [vit_spec], ExtractOptions(views=2, pixels="", progress=False, workers=0))
    feats = read_features(url, pixels=True)  # what every pixel row writes: the store's own JPEGs
    s = Store.open(url)
    name = s.complete_shards()[0]
    assert [row[1] for row in feats.shards[name]["pixels/jpeg"]] == s.read_pixels(name, 0, 8, view=1)
    # one worker: every row's samples cross a process boundary, as in the bench's default
    code, out, err = cli_call(monkeypatch, capsys, "bench", "formats", "--store", url, "--repeat", "1", "--json",
                              "--quantize", "none", "--workers", "1", "--batch-size", "8")
    assert code == 0, err
    r = json.loads(out)
    assert set(PIXEL_ROWS.values()) <= set(r["formats"]) and r["fastest_pixel_peer"] in PIXEL_ROWS.values()
    assert r["pixels_store_over_fastest_peer_read"]["median"] > 0
    assert all(r["read"]["items"][n] == 16 for n in PIXEL_ROWS.values())  # every sample, JPEGs and targets
    assert r["formats"][PIXEL_ROWS["store"]]["bytes_per_sample"] > r["formats"]["kdcache store, fp16"]["bytes_per_sample"]
