"""eval.knn: the evaluator is sane, and a store's kNN equals an independent computation."""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional
import zarr
from torchvision.transforms import InterpolationMode
from helpers import cli_call, one_error_line

from kdcache.eval.knn import knn_classify, seeded_split


def test_one_hot_labels_are_perfect_and_random_features_are_chance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 3000)
    tr, va = seeded_split(len(y), val_fraction=0.3, seed=1)
    onehot = np.eye(10, dtype=np.float32)[y]
    assert knn_classify(onehot[tr], y[tr], onehot[va], y[va])["top1"] == 1.0
    r = knn_classify(rng.standard_normal((3000, 64))[tr], y[tr], rng.standard_normal((3000, 64))[va], y[va])
    assert abs(r["top1"] - 0.1) < 0.04 and abs(r["top5"] - 0.5) < 0.06


def _brute(train_x, train_y, val_x, val_y, k=20, t=0.07):
    u = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = u(val_x.astype(np.float64)) @ u(train_x.astype(np.float64)).T
    hits1 = hits5 = 0
    for i in range(len(val_x)):
        nn = np.argsort(-sims[i], kind="stable")[:k]
        votes = {}
        for j in nn:
            votes[train_y[j]] = votes.get(train_y[j], 0.0) + np.exp(sims[i, j] / t)
        ranked = sorted(votes, key=lambda c: -votes[c])
        hits1 += ranked[0] == val_y[i]
        hits5 += val_y[i] in ranked[:5]
    return hits1 / len(val_x), hits5 / len(val_x)


def test_knn_equals_a_brute_force_vote():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, 400)
    x = rng.standard_normal((400, 16)) + 2 * np.eye(6, 16)[y]
    tr, va = seeded_split(400, val_fraction=0.25, seed=0)
    r = knn_classify(x[tr], y[tr], x[va], y[va])
    assert (r["top1"], r["top5"]) == pytest.approx(_brute(x[tr], y[tr], x[va], y[va]))


@pytest.mark.parametrize("slice_bytes", [1 << 28, 4 * 300 * 7])  # one slice; slices of 7 queries (the last short)
def test_the_search_is_faisss_exact_inner_product_search(monkeypatch, slice_bytes):
    """The torch search returns what faiss's IndexFlatIP returns: the same neighbours in the same
    order, the same similarities (to float32 rounding), sliced or not."""
    faiss = pytest.importorskip("faiss")
    from kdcache.eval import knn
    monkeypatch.setattr(knn, "SEARCH_BYTES", slice_bytes)
    rng = np.random.default_rng(5)
    train, query = knn._unit(rng.standard_normal((300, 24))), knn._unit(rng.standard_normal((45, 24)))
    index = faiss.IndexFlatIP(24)
    index.add(train)
    want_sims, want_idx = index.search(query, 20)
    sims, idx = knn.nearest(train, query, 20)
    assert sims.shape == idx.shape == (45, 20) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sims, want_sims, rtol=0, atol=1e-5)


def test_knn_needs_no_faiss(monkeypatch):
    """eval knn runs where faiss is not installed (the core install): importing it fails here."""
    import builtins
    import importlib
    real = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    monkeypatch.delitem(__import__("sys").modules, "faiss", raising=False)
    import kdcache.eval.knn as knn
    knn = importlib.reload(knn)
    y = np.arange(40) % 4
    x = np.eye(4, 8)[y] + 0.01 * np.random.default_rng(0).standard_normal((40, 8))
    assert knn.knn_classify(x[:30], y[:30], x[30:], y[30:], k=3)["top1"] == 1.0


@pytest.fixture(scope="module")
def store(vit_store):
    return vit_store


def test_a_store_knn_equals_an_independent_computation(store, corpus, monkeypatch, capsys):
    code, out, _ = cli_call(monkeypatch, capsys, "eval", "knn", "--store", store, "--data", corpus, "--k", "5", "--json")
    r = json.loads(out)
    # independently: plain zarr for the features, tarfile for the labels
    root = zarr.open_group(store, mode="r")
    labels = {}
    for tar in sorted(os.listdir(corpus)):
        with tarfile.open(os.path.join(corpus, tar)) as t:
            for m in t.getmembers():
                if m.name.endswith(".cls"):
                    labels[m.name[:-4]] = int(t.extractfile(m).read())
    xs, ys = [], []
    for name in sorted(root["shards"].group_keys()):
        g = root["shards"][name]
        xs.append(np.asarray(g["vit/cls"][:, 0], dtype=np.float32))
        ys += [labels[k] for k in g["keys"][:].tolist()]
    x, y = np.concatenate(xs), np.asarray(ys)
    tr, va = seeded_split(len(y), val_fraction=0.2, seed=0)
    assert code == 0 and (r["top1"], r["top5"]) == pytest.approx(_brute(x[tr], y[tr], x[va], y[va], k=5))
    assert r["n_val"] == 5 and r["protocol"]["k"] == 5 and r["protocol"]["temperature"] == 0.07
    code, out, _ = cli_call(monkeypatch, capsys, "eval", "knn", "--store", store, "--data", corpus)
    assert "| top-1 | top-5 |" in out


def test_eval_stops_on_a_corrupt_shard_or_skips_it(tmp_path, store, corpus, monkeypatch, capsys):
    copy = str(tmp_path / "c.zarr")
    shutil.copytree(store, copy)
    d = os.path.join(copy, "shards", "demo-000002", "vit", "cls", "c")
    os.remove([os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs][0])  # the cls chunk: Zarr would read fill values
    code, _, err = cli_call(monkeypatch, capsys, "eval", "knn", "--store", copy, "--data", corpus)
    line = one_error_line(err)
    assert code == 2 and "shard demo-000002" in line and "vit/cls" in line
    code, out, _ = cli_call(monkeypatch, capsys, "eval", "knn", "--store", copy, "--data", corpus, "--skip-corrupt", "--json")
    r = json.loads(out)
    assert code == 0 and list(r["skipped_shards"]) == ["demo-000002"] and r["n_train"] + r["n_val"] == 16


def test_a_run_s_student_is_evaluated_as_the_exported_model_sees_the_images(tmp_path, store, corpus, monkeypatch, capsys):
    from kdcache.eval.model_features import labelled_model_features, run_student, spec_model
    from kdcache.train.config import TrainConfig
    from kdcache.train.fit import train
    run = str(tmp_path / "run")
    train(TrainConfig(store=store, data=corpus, student="resnet18,img_size=48", out=run, epochs=1, batch_size=4, workers=0,
                      head_hidden=16, amp="none"), progress=False)
    net, data, _ = run_student(run)
    assert data.hw == (48, 48)  # the size it was trained at, though resnet18 takes no img_size
    f = labelled_model_features(net, data, corpus)
    # independently: the exported weights in a fresh timm model, on the eval crop cut by hand
    import safetensors.torch
    from kdcache.data.corpus import resolve_corpus
    from kdcache.data.pixels import decode_sample
    from kdcache.data.walk import shard_samples
    m = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    m.load_state_dict(safetensors.torch.load_file(f"{run}/checkpoints/last/student.safetensors"))
    c = resolve_corpus(corpus)
    s = next(iter(shard_samples(c, c.shards[0])))
    rgb = torch.from_numpy(decode_sample(s)).permute(2, 0, 1)
    h, w = rgb.shape[1:]
    side = round(data.crop_pct * min(h, w))
    top, left = round((h - side) / 2), round((w - side) / 2)
    crop = torchvision.transforms.v2.functional.resized_crop(rgb, top, left, side, side, [48, 48],
                                                            interpolation=InterpolationMode(data.interpolation), antialias=True)
    x = (crop.float()[None] / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = m(x)[0].numpy()
    np.testing.assert_allclose(f["x"][0], ref, rtol=1e-4, atol=1e-4)
    for args in (["--run", run], ["--model", "resnet18,img_size=48"]):
        code, out, err = cli_call(monkeypatch, capsys, "eval", "knn", "--data", corpus, "--k", "5", "--json", *args)
        assert code == 0 and json.loads(out)["n_val"] == 5, err
    assert spec_model("resnet18,img_size=48")[1].hw == (48, 48)
    code, _, err = cli_call(monkeypatch, capsys, "eval", "knn", "--data", corpus)
    assert code == 2 and "exactly one of --store, --run, --model" in one_error_line(err)


def test_linear_probe_separates_separable_features_and_chooses_c_on_training_data_only(store, corpus, monkeypatch, capsys):
    from kdcache.eval.linear import linear_probe
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    x = rng.standard_normal((400, 8)) * 0.1 + np.eye(4, 8)[y] * 3
    tr, va = seeded_split(400, val_fraction=0.25, seed=0)
    r = linear_probe(x[tr], y[tr], x[va], y[va])
    assert r["top1"] == 1.0 and r["n_val"] == 100 and set(r["validation_accuracy_by_C"]) == {"0.001", "0.01", "0.1", "1", "10", "100"}
    noise = linear_probe(rng.standard_normal((300, 8)), y[:300], rng.standard_normal((100, 8)), y[300:])
    assert noise["top1"] < 0.45
    code, out, err = cli_call(monkeypatch, capsys, "eval", "linear", "--data", corpus, "--store", store, "--json")
    r = json.loads(out)
    assert code == 0 and 0 <= r["top1"] <= 1 and r["protocol"]["probe"].startswith("logistic regression"), err


def test_eval_store_reports_bytes_and_measures_what_quantization_kept(tmp_path, store, monkeypatch, capsys):
    from kdcache.quantize.convert_store import quantize_store
    from kdcache.quantize.quantizer_spec import QuantizerSpec
    from kdcache.targets.sample import SampleSpec
    code, out, _ = cli_call(monkeypatch, capsys, "eval", "store", store, "--json")
    t = json.loads(out)["teachers"]["vit"]
    on_disk = sum(a.nbytes_stored() for n, g in zarr.open_group(store, mode="r")["shards"].groups()
                  for p, a in g.members(max_depth=None) if p.startswith("vit/") and hasattr(a, "nbytes_stored"))
    assert code == 0 and t["bytes_per_sample"] == pytest.approx(on_disk / 24)
    assert t["fp32_bytes_per_sample"] == 2 * 5 * 192 * 4 and t["quantized"] == {}
    q = str(tmp_path / "q.zarr")
    shutil.copytree(store, q)
    quantize_store(q, "vit", QuantizerSpec.parse("sq8"), keep_float=True, sample=SampleSpec(train_tokens=128, held_out=16, pool=1),
                   progress=False)
    code, out, _ = cli_call(monkeypatch, capsys, "eval", "store", q, "--json")
    e = json.loads(out)["teachers"]["vit"]["quantized"]["patch"]
    # independently: plain zarr floats and codes, decoded with the numpy formula of the README
    root = zarr.open_group(q, mode="r")
    qz = root["quantizers/vit/patch"]
    x = np.concatenate([np.asarray(g["vit/patch"][:], np.float32).reshape(-1, 192) for _, g in sorted(root["shards"].groups())])
    c = np.concatenate([np.asarray(g["vit/patch_codes"][:]).reshape(-1, 192) for _, g in sorted(root["shards"].groups())])
    books = qz["codebooks"][:]
    y = books[np.arange(192), c].reshape(len(c), -1) @ qz["rotation"][:] + qz["mean"][:]
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert code == 0 and e["mean_cos"] == pytest.approx(cos.mean(), rel=1e-5) and e["measured_on"].startswith("192 stored")


def test_a_given_validation_corpus_replaces_the_seeded_split(tmp_path, store, corpus, many_shards, vit_spec, monkeypatch, capsys):
    from kdcache.eval.model_features import labelled_model_features, spec_model
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    model = "resnet18,img_size=32"
    code, out, err = cli_call(monkeypatch, capsys, "eval", "knn", "--data", corpus, "--val-data", many_shards, "--model",
                              model, "--k", "5", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["n_train"], r["n_val"]) == (24, 36) and r["protocol"]["split"].startswith("given")
    net, data, _ = spec_model(model)  # independently: features of each corpus, one kNN
    a, b = labelled_model_features(net, data, corpus), labelled_model_features(net, data, many_shards)
    assert r["top1"] == knn_classify(a["x"], a["y"], b["x"], b["y"], k=5, temperature=0.07)["top1"]
    val_store = str(tmp_path / "val.zarr")  # cached features: the validation corpus's own store
    extract(many_shards, val_store, [vit_spec], ExtractOptions(progress=False, workers=0))
    code, out, err = cli_call(monkeypatch, capsys, "eval", "knn", "--data", corpus, "--store", store, "--val-data",
                              many_shards, "--val-store", val_store, "--json")
    assert code == 0, err
    assert (json.loads(out)["n_train"], json.loads(out)["n_val"]) == (24, 36)
    code, _, err = cli_call(monkeypatch, capsys, "eval", "knn", "--data", corpus, "--store", store, "--val-data", many_shards)
    assert code == 2 and "--val-store and --val-data go together" in one_error_line(err)
