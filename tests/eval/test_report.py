"""kdcache report: a markdown file with every table and its PNGs, for a cached and an online run."""
from __future__ import annotations

import json
import os

from helpers import cli_call, one_error_line

from kdcache.eval.model_features import probe_model
from kdcache.eval.store_features import probe_store
from kdcache.store import Store
from kdcache.train.config import TrainConfig
from kdcache.train.fit import train

PNG = b"\x89PNG\r\n\x1a\n"


def _train(out, corpus, **kw):
    base = dict(data=corpus, student="resnet18,img_size=32", out=str(out), epochs=1, batch_size=4, workers=0,
                head_hidden=16, amp="none", log_every=2)
    train(TrainConfig(**{**base, **kw}), progress=False)
    return str(out)


def test_report_of_a_cached_run_has_every_table_and_plot(tmp_path, vit_store, corpus, monkeypatch, capsys):
    run = _train(tmp_path / "run", corpus, store=vit_store)
    code, out, err = cli_call(monkeypatch, capsys, "report", run, "--json")
    assert code == 0, err
    r = json.loads(out)
    text = open(r["report"]).read()
    for heading in ("## Losses", "## kNN", "## Bytes per sample", "| teacher | summary loss (last) | patch loss (last) |",
                    "| features | kNN top-1 | kNN top-5 |", "| teacher | views | fp32 KiB | fp16 KiB | stored KiB |"):
        assert heading in text
    for name in ("losses", "knn", "bytes"):
        with open(r["files"][name], "rb") as f:
            assert f.read(8) == PNG
        assert f"]({name}.png)" in text  # relative links: the directory reads anywhere
    rows = {row["features"]: row for row in r["knn"]}
    assert set(rows) == {"random-init student", "distilled student", "teacher vit (cached)"}
    # each row equals the evaluation run on its own
    assert rows["teacher vit (cached)"]["top1"] == probe_store(vit_store, corpus, teacher="vit")["top1"]
    assert rows["distilled student"]["top1"] == probe_model("run", corpus, run=run)["top1"]
    (b,) = r["bytes"]
    meta = Store.open(vit_store).meta.teachers["vit"]
    assert b["fp16"] == 2 * (meta.tokens + 1) * meta.dim * 2 and b["fp32"] == 2 * b["fp16"]  # K=2 views
    from kdcache.eval.store_report import store_report  # (tiny shards: metadata outweighs their 8 samples)
    assert b["stored"] == store_report(vit_store)["teachers"]["vit"]["bytes_per_sample"] > 0
    assert f"| vit | 2 | {b['fp32'] / 1024:.1f} | {b['fp16'] / 1024:.1f} | {b['stored'] / 1024:.1f} |" in text
    # a second report reuses the kNN of the unchanged checkpoint
    mtime = os.path.getmtime(os.path.join(run, "report", "knn.json"))
    code, out, err = cli_call(monkeypatch, capsys, "report", run)
    assert code == 0 and out.strip() == r["report"]
    assert os.path.getmtime(os.path.join(run, "report", "knn.json")) == mtime


def test_report_of_an_online_run_runs_the_teacher_live(tmp_path, corpus, vit_spec, monkeypatch, capsys):
    run = _train(tmp_path / "online", corpus, store="", online=True, teachers=(vit_spec,), online_stats_images=8)
    code, out, err = cli_call(monkeypatch, capsys, "report", run, "--json", "--out", str(tmp_path / "rep"))
    assert code == 0, err
    r = json.loads(out)
    assert [row["features"] for row in r["knn"]][-1] == "teacher vit (live)"
    assert r["bytes"][0]["stored"] is None and r["bytes"][0]["views"] == 1
    assert "online: teachers" in open(r["report"]).read()


def test_report_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = cli_call(monkeypatch, capsys, "report", str(tmp_path))
    assert code != 0 and "config.json" in one_error_line(err)


def test_report_recomputes_after_the_store_changes_and_refuses_a_damaged_one(tmp_path, vit_store, corpus, vit_spec,
                                                                               monkeypatch, capsys):
    import shutil

    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    store = str(tmp_path / "s.zarr")
    shutil.copytree(vit_store, store)
    run = _train(tmp_path / "run", corpus, store=store)
    cache = os.path.join(run, "report", "knn.json")
    assert cli_call(monkeypatch, capsys, "report", run)[0] == 0
    key = json.load(open(cache))["key"]
    assert cli_call(monkeypatch, capsys, "report", run)[0] == 0 and json.load(open(cache))["key"] == key  # reused
    shutil.rmtree(store)  # the store replaced: the same corpus extracted again, with other views
    extract(corpus, store, [vit_spec], ExtractOptions(views=2, seed=7, progress=False, workers=0))
    code, out, err = cli_call(monkeypatch, capsys, "report", run, "--json")
    assert code == 0 and json.load(open(cache))["key"] != key, err
    chunk = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(store, "shards", "demo-000001", "vit", "cls"))
             for f in fs if "/c/" in os.path.join(r, f)][0]
    b = bytearray(open(chunk, "rb").read())
    b[100] ^= 0x40  # in the first rows (an uncompressed last chunk is padded: a flip there changes no row)
    open(chunk, "wb").write(bytes(b))  # damaged in place: the digests it records are unchanged
    code, _, err = cli_call(monkeypatch, capsys, "report", run)
    assert code == 2 and "shard demo-000001: vit/cls" in one_error_line(err)
