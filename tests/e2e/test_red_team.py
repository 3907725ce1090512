"""The red-team matrix: every kind of damage, in every array a reader touches, against every reading
command, through the real command line, on copies of a valid store (float, and quantized for
codes). Each command either reads the damaged part and refuses it in exactly one line (exit 2;
verify: exit 1 with a MISMATCH naming the shard, or exit 2), or does not read it and answers
exactly what it answers on the undamaged store. Never a traceback; never exit 0 with a result
read from the damaged part."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import cli_call

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"
SHARD = "demo-000001"


def _chunks(store, path):
    """The array's Zarr shard objects in the one-block shard: one, or one per view (format 2, K=2),
    all damaged alike: whichever view a command reads is damaged."""
    d = os.path.join(store, "shards", SHARD, path, "c")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
    assert len(files) == (1 if path in ("keys", "views") else 2), files
    return files


def _flip(path):
    def damage(store):
        for p in _chunks(store, path):
            b = bytearray(open(p, "rb").read())
            for i in (20, len(b) // 3):  # in the first values (an uncompressed block padded to its full size holds
                b[i] ^= 0x40             # them at the start) and inside a compressed stream
            open(p, "wb").write(bytes(b))
    return damage


def _truncate(path):
    def damage(store):
        for p in _chunks(store, path):
            data = open(p, "rb").read()
            open(p, "wb").write(data[: len(data) // 2])
    return damage


def _delete(path):
    def damage(store):
        for p in _chunks(store, path):
            os.remove(p)
    return damage


ARRAYS = {"keys": "keys", "views": "views", "cls": "vit/cls", "patch": "vit/patch", "codes": "vit/patch_codes",
          "logit values": "vit/logits_values", "logit indices": "vit/logits_indices", "log-sum-exp": "vit/logits_lse"}
SOFT = ("logit values", "logit indices", "log-sum-exp")
DAMAGES = {f"{how} {name}": (name, make(path)) for name, path in ARRAYS.items()
           for how, make in (("flipped byte in", _flip), ("truncated", _truncate), ("deleted", _delete))}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, vit_store, corpus, vit_spec):
    """A float store, the same store with its patches as sq8 codes (floats dropped), and one with the
    teacher's top-5 soft labels."""
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    from kdcache.quantize.convert_store import quantize_store
    from kdcache.quantize.quantizer_spec import QuantizerSpec
    from kdcache.targets.sample import SampleSpec
    q = str(tmp_path_factory.mktemp("codes") / "q.zarr")
    shutil.copytree(vit_store, q)
    quantize_store(q, "vit", QuantizerSpec.parse("sq8"), sample=SampleSpec(train_tokens=128, held_out=16, pool=1),
                   progress=False)
    soft = str(tmp_path_factory.mktemp("soft") / "l.zarr")
    extract(corpus, soft, [vit_spec], ExtractOptions(views=2, logits=5, progress=False, workers=0))
    return {"float": vit_store, "codes": q, "logits": soft}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, vit_store, corpus):
    """A run trained on the float store: `report` is run on copies of it pointed at damaged stores."""
    from kdcache.train.config import TrainConfig
    from kdcache.train.fit import train
    out = str(tmp_path_factory.mktemp("redteam") / "run")
    train(TrainConfig(store=vit_store, data=corpus, student=STUDENT, out=out, epochs=1, batch_size=4, workers=0,
                      head_hidden=16), progress=False)
    return out


class _Cli:
    def __init__(self, monkeypatch, capsys):
        self.monkeypatch, self.capsys = monkeypatch, capsys

    def __call__(self, *args):
        code, out, err = cli_call(self.monkeypatch, self.capsys, *args)
        return code, out, err


def _commands(store, corpus, tmp, run, *, soft=False):
    """name -> (argv, the arrays the command reads). ``soft``: train on the soft labels too."""
    train = ["train", "--store", store, "--data", corpus, "--student", STUDENT, "--epochs", "1", "--batch-size", "4",
             "--head-hidden", "16", "--no-progress", *(["--logits-loss", "kl"] if soft else [])]
    every = set(ARRAYS)
    return {
        "info": (["info", store, "--json"], set()),
        "verify": (["verify", store], every),
        "verify --data": (["verify", store, "--data", corpus], every),
        "train": ([*train, "--out", f"{tmp}/trained", "--workers", "2"], every),
        "train --skip-corrupt": ([*train, "--out", f"{tmp}/skip", "--workers", "0", "--skip-corrupt"], every),
        "eval knn --store": (["eval", "knn", "--store", store, "--data", corpus, "--k", "3", "--json"], {"keys", "cls"}),
        "store copy": (["store", "copy", store, f"{tmp}/copy.zarr", "--no-progress"], every),
        "store subset": (["store", "subset", store, "--shards", "demo-00000[01]", "--out", f"{tmp}/sub.zarr",
                          "--no-progress"], every),
        "store merge": (["store", "merge", store, "--out", f"{tmp}/merged.zarr", "--no-progress"], every),
        "report": (["report", run, "--json"], {"keys", "cls"}),
    }


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("kdcache: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2500:]
    return lines[0]


def _comparable(name: str, out: str):
    """What a command answered, without what legitimately differs between two copies (paths)."""
    if name == "eval knn --store":
        r = json.loads(out)
        return r["top1"], r["top5"], r["n_train"], r["n_val"]
    if name == "info":
        r = json.loads(out)
        return r["samples"], r["shards_complete"]
    if name == "report":
        return [(r["features"], r["top1"]) for r in json.loads(out)["knn"]]
    return None


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_reader_refuses_every_damage_in_one_line(tmp_path, stores, corpus, run_dir, damage, monkeypatch, capsys):
    array, apply = DAMAGES[damage]
    cli = _Cli(monkeypatch, capsys)
    kind = "codes" if array == "codes" else "logits" if array in SOFT else "float"
    good, store = stores[kind], str(tmp_path / "damaged.zarr")
    shutil.copytree(good, store)
    apply(store)
    run = str(tmp_path / "run")  # the run, pointed at the damaged store
    shutil.copytree(run_dir, run)
    cfg = json.load(open(os.path.join(run, "config.json")))
    json.dump({**cfg, "store": store}, open(os.path.join(run, "config.json"), "w"))
    shutil.rmtree(os.path.join(run, "report"), ignore_errors=True)
    answers_on_good = {}
    for name, (argv, reads) in _commands(store, corpus, str(tmp_path), run, soft=kind == "logits").items():
        if kind != "float" and name == "report":
            continue  # the run was trained on the float store
        code, out, err = cli(*argv)
        assert "Traceback" not in err, (name, err[-2500:])
        if array not in reads:  # not read: the same answer as on the undamaged store
            assert code == 0, (name, err[-2000:])
            if name not in answers_on_good:
                gargv = [good if a == store else a for a in argv]
                if name == "report":
                    json.dump({**cfg, "store": good}, open(os.path.join(run, "config.json"), "w"))
                    shutil.rmtree(os.path.join(run, "report"), ignore_errors=True)
                gcode, gout, _ = cli(*gargv)
                answers_on_good[name] = _comparable(name, gout)
            assert _comparable(name, out) == answers_on_good[name], name
        elif name.startswith("verify") and code == 1:
            assert f"MISMATCH shard {SHARD}" in out and ARRAYS[array] in out, (name, out)
        elif name == "train --skip-corrupt":
            assert code == 0, (name, err[-2000:])
            r = json.loads(out)
            assert r["skipped"]["shards"] == [SHARD] and r["steps"] == 4, (name, r)  # 2 good shards of 8, batch 4
        else:
            line = _one_line(err)
            assert code == 2 and f"shard {SHARD}" in line and ARRAYS[array] in line, (name, line)


HOSTILE = {
    "a shard named ..evil": (lambda s: shutil.copytree(os.path.join(s, "shards", "demo-000000"),
                                                       os.path.join(s, "shards", "..evil")), "shard name '..evil'"),
    "count -5": (lambda s: _edit_attrs(s, count=-5), "field 'count'"),
    "count 'x'": (lambda s: _edit_attrs(s, count="x"), "field 'count'"),
    "count larger": (lambda s: _edit_attrs(s, count=9), "does not hash to its binding"),
}


def _edit_attrs(store, **changes):
    path = os.path.join(store, "shards", SHARD, "zarr.json")
    d = json.load(open(path))
    d["attributes"].update(changes)
    json.dump(d, open(path, "w"))


@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_every_reader_refuses_hostile_names_and_absurd_attributes_the_same_way(tmp_path, stores, corpus, run_dir, hostile,
                                                                                 monkeypatch, capsys):
    apply, match = HOSTILE[hostile]
    cli = _Cli(monkeypatch, capsys)
    store = str(tmp_path / "damaged.zarr")
    shutil.copytree(stores["float"], store)
    apply(store)
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    cfg = json.load(open(os.path.join(run, "config.json")))
    json.dump({**cfg, "store": store}, open(os.path.join(run, "config.json"), "w"))
    for name, (argv, _) in _commands(store, corpus, str(tmp_path), run).items():
        if name == "train --skip-corrupt" and hostile != "a shard named ..evil":
            continue  # skipping a shard whose metadata is invalid: tested in test_corruption
        code, out, err = cli(*argv)
        if name.startswith("verify") and code == 1:  # found by reading the arrays: a finding, named
            assert f"MISMATCH shard {SHARD}" in out and match in out, (name, out)
            continue
        if name == "info" and hostile.startswith("count"):
            # info answers from the shard index (verified against the root's digest) and never opens a
            # shard's own metadata: it answers exactly what it answers on the undamaged store
            gcode, gout, _ = cli("info", stores["float"], "--json")
            assert code == gcode == 0 and _comparable(name, out) == _comparable(name, gout), (name, out, err[-2000:])
            continue
        assert code == 2 and match in _one_line(err), (name, code, err[-2000:])
