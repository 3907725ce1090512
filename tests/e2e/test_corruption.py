"""Readers that trust nothing: corrupted data and hostile metadata in copies of a valid store, run
through the real CLI. Never a traceback, never a silent wrong answer: one line and a non-zero
exit, or with --skip-corrupt an exit 0 that reports exactly what was skipped."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import cli_call


STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


@pytest.fixture(scope="module")
def good(vit_store):
    return vit_store


def _copy(good, tmp_path):
    dst = str(tmp_path / "copy.zarr")
    shutil.copytree(good, dst)
    return dst


def _chunks(store, shard, path):
    """The Zarr shard objects of an array of a one-block shard: one per stored view (format 2), so
    a run reads one of them whichever view its epoch draws."""
    d = os.path.join(store, "shards", shard, path, "c")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
    assert len(files) == 2, files  # the K=2 test store
    return files


def _edit_json(path, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def _flip(store):
    for p in _chunks(store, "demo-000001", "vit/patch"):
        b = bytearray(open(p, "rb").read())
        b[100] ^= 0x40  # inside the first inner chunk's rows (further on may be the padding of a partial last chunk)
        open(p, "wb").write(bytes(b))


def _delete_cls(store):
    for p in _chunks(store, "demo-000001", "vit/cls"):
        os.remove(p)


def _truncate(store):
    for p in _chunks(store, "demo-000001", "vit/patch"):
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])


def _count(value):
    def edit(store):
        _edit_json(os.path.join(store, "shards", "demo-000001", "zarr.json"), lambda d: d["attributes"].update(count=value))
    return edit


CORRUPTIONS = {"flipped byte in patch": (_flip, "vit/patch"), "deleted cls chunk": (_delete_cls, "vit/cls"),
               "truncated patch chunk": (_truncate, "vit/patch"), "count -5": (_count(-5), "count"),
               "count 'x'": (_count("x"), "count"), "count larger": (_count(9), "does not hash to its binding")}


class _Run:
    """``kdcache ARGS`` run in this process (as the console script runs it)."""

    def __init__(self, monkeypatch, capsys):
        self.monkeypatch, self.capsys = monkeypatch, capsys

    def __call__(self, *args):
        self.returncode, self.stdout, self.stderr = cli_call(self.monkeypatch, self.capsys, *args)
        return self

    def train(self, store, corpus, out, *extra):
        return self("train", "--store", store, "--data", corpus, "--student", STUDENT, "--out", str(out), "--epochs", "1",
                    "--batch-size", "4", "--workers", "1", "--head-hidden", "16", "--amp", "none", "--no-progress", *extra)


@pytest.fixture
def cli(monkeypatch, capsys):
    return _Run(monkeypatch, capsys)


def _one_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("kdcache: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_shard_is_found_by_verify_and_stops_or_is_skipped_by_train(tmp_path, good, corpus, name, cli):
    corrupt, array = CORRUPTIONS[name]
    store = _copy(good, tmp_path)
    corrupt(store)
    before = sorted(os.listdir(store))
    v = cli("verify", store)
    assert v.returncode in (1, 2) and "Traceback" not in v.stderr
    assert "demo-000001" in (v.stdout if v.returncode == 1 else _one_line(v)), (v.stdout, v.stderr)
    stop = cli.train(store, corpus, tmp_path / "stop")
    line = _one_line(stop)
    assert stop.returncode == 2 and "shard demo-000001" in line and array in line, line
    skip = cli.train(store, corpus, tmp_path / "skip", "--skip-corrupt")
    assert skip.returncode == 0, skip.stderr[-2000:]
    result = json.loads(skip.stdout)
    assert result["skipped"]["shards"] == ["demo-000001"] and result["steps"] == 4  # 2 good shards of 8 samples, batch 4
    assert sorted(os.listdir(store)) == before  # training wrote nothing into the store (no statistics cached)
    # eval reads the summary features only: a corrupt patch array does not change its answer
    ev = cli("eval", "knn", "--store", store, "--data", corpus, "--k", "3", "--json")
    if array == "vit/patch":
        assert ev.returncode == 0 and json.loads(ev.stdout)["n_val"] == 5
    else:
        assert ev.returncode == 2 and "shard demo-000001" in _one_line(ev)
        ev = cli("eval", "knn", "--store", store, "--data", corpus, "--k", "3", "--json", "--skip-corrupt")
        assert ev.returncode == 0 and list(json.loads(ev.stdout)["skipped_shards"]) == ["demo-000001"]


def _root(edit):
    def apply(store):
        _edit_json(os.path.join(store, "zarr.json"), lambda d: edit(d["attributes"]["kdcache"]))
    return apply


def _shard_not_json(store):
    open(os.path.join(store, "shards", "demo-000000", "zarr.json"), "w").write("{not json")


def _dotdot_shard(store):
    shutil.copytree(os.path.join(store, "shards", "demo-000000"), os.path.join(store, "shards", "..x"))


HOSTILE = {
    "dim=1e12": (_root(lambda k: k["teachers"]["vit"].update(dim=10 ** 12)), "field 'dim'"),
    "views='two'": (_root(lambda k: k.update(views="two")), "field 'views'"),
    "teachers as a list": (_root(lambda k: k.update(teachers=["vit"])), "field 'teachers'"),
    "grid of strings": (_root(lambda k: k["teachers"]["vit"].update(grid=["a", "b"])), "field 'grid'"),
    "dtype unknown": (_root(lambda k: k["teachers"]["vit"].update(dtype="float8")), "field 'dtype'"),
    "teacher named ..": (_root(lambda k: k.update(teachers={"..": k["teachers"]["vit"]})), "teacher name '..'"),
    "top-K beyond the classes": (_root(lambda k: k["teachers"]["vit"].update(logits={"k": 9, "classes": 5, "index_dtype": "uint8"})),
                                 "field 'k'"),
    "indices too narrow": (_root(lambda k: k["teachers"]["vit"].update(logits={"k": 5, "classes": 70000,
                                                                               "index_dtype": "uint8"})), "field 'index_dtype'"),
    "shard zarr.json not JSON": (_shard_not_json, "shard demo-000000: metadata unreadable"),
    "shard named ..x": (_dotdot_shard, "shard name '..x'"),
    "digest names a path outside": (lambda s: _edit_json(os.path.join(s, "shards", "demo-000000", "zarr.json"),
                                                          lambda d: d["attributes"]["digest"].update({"../../x": "0" * 64})),
                                    "digest names '../../x'"),
}


SHARD_LEVEL = ("shard zarr.json not JSON", "digest names a path outside")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_metadata_is_one_line_for_every_reader(tmp_path, good, corpus, name, cli):
    edit, match = HOSTILE[name]
    store = _copy(good, tmp_path)
    edit(store)
    if name in SHARD_LEVEL:  # info answers from the shard index, says so, and reads no shard; without the index it does
        p = cli("info", store)
        assert p.returncode == 0 and "3 of 3 complete shards described by the shard index" in p.stdout, p.stderr[-1500:]
        p = cli("info", store, "--check")  # every shard's own metadata: the broken one flagged, the rest described
        assert p.returncode == 0 and "1 whose own metadata every reader refuses" in p.stdout and match in p.stdout, p.stdout
        for args in (["verify", store], ["verify", store, "--data", corpus]):  # a finding, listed with the others
            p = cli(*args)
            assert p.returncode == 1 and "MISMATCH shard demo-000000: " in p.stdout and match in p.stdout, p.stdout
        os.remove(os.path.join(store, "shard_index.json"))
        p = cli("info", store)  # no index: every shard asked, the broken one flagged
        assert p.returncode == 0 and "1 whose own metadata every reader refuses" in p.stdout, p.stdout
    else:
        for args in (["info", store], ["info", store, "--json"], ["verify", store], ["verify", store, "--data", corpus]):
            p = cli(*args)
            assert p.returncode == 2 and match in _one_line(p), (args, p.stderr[-1500:])
    p = cli.train(store, corpus, tmp_path / "run")  # (a stray shard name is refused too: names are checked on open)
    assert p.returncode == 2 and match in _one_line(p)


def test_array_metadata_that_would_make_a_reader_allocate_petabytes_is_refused(tmp_path, good, corpus, cli):
    store = _copy(good, tmp_path)

    def huge(d):
        d["shape"][0] = 2 ** 40
        d["chunk_grid"]["configuration"]["chunk_shape"][0] = 2 ** 40
    _edit_json(os.path.join(store, "shards", "demo-000001", "vit", "patch", "zarr.json"), huge)
    for p in (cli("verify", store), cli.train(store, corpus, tmp_path / "run")):
        assert p.returncode == 2 and "exceed what kdcache reads at once" in _one_line(p)
