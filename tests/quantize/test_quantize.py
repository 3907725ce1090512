"""Quantizers: torch decode == faiss decode == numpy formula; low-rank data near exact; the two
ways in (during / after extraction) agree; quantized stores stay plain zarr."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from conftest import run_cli

from kdcache.extract.options import ExtractOptions

from kdcache.extract.run import extract
from kdcache.quantize.convert_store import quantize_store
from kdcache.quantize.methods import encode, faiss_decode, fit
from kdcache.quantize.quantizer_spec import QuantizerSpec
from kdcache.targets.sample import SampleSpec
from kdcache.targets.decoding import CodeDecoder, TargetDecoder, stored_codebooks
from kdcache.quantize.reconstruction import reconstruction_fidelity as fidelity
from kdcache.store import Store
from kdcache.store.inspect import info

SPECS = ["pq:m=8", "opq:m=8,opq_iter=8", "pca:m=8", "rq:m=4,beam=2,niter=8", "sq8", "sq4",
         "pq:m=9,norm=1", "rq:m=5,beam=2,niter=8,norm=1", "rq:m=5,beam=2,niter=8,norm=1,refine=2"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((12, 32)).astype(np.float32)
    x = rng.standard_normal((3000, 12)).astype(np.float32) @ basis + 3.0  # rank 12 + offset
    return x[:2500], x[2500:]


@pytest.mark.parametrize("spec", SPECS)
def test_torch_decoder_equals_faiss_and_numpy(data, spec):
    train, test = data
    cb = fit(QuantizerSpec.parse(spec), train, seed=0)
    codes = encode(cb, test)
    assert codes.dtype == np.uint8 and codes.shape == (len(test), cb.m)
    ref = faiss_decode(cb, codes)
    np.testing.assert_allclose(cb.decode(codes), ref, rtol=1e-4, atol=1e-4)
    dec = CodeDecoder(cb)
    got = dec(torch.from_numpy(codes).view(10, 50, cb.m))  # any leading shape
    assert got.shape == (10, 50, 32) and got.dtype == torch.float32
    np.testing.assert_allclose(got.reshape(-1, 32).numpy(), ref, rtol=1e-4, atol=1e-4)
    f = fidelity(test, ref)
    assert f["relmse"] < {"sq4": 0.02, "sq8": 1e-3}.get(spec, 0.6) and f["mean_cos"] > 0.9


@pytest.mark.parametrize("spec", ["pq:m=8", "opq:m=8,opq_iter=8", "rq:m=4,beam=2,niter=8", "rq:m=5,beam=2,niter=8,norm=1"])
def test_low_rank_data_is_reconstructed_near_exactly(spec):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, 1)) @ rng.standard_normal((1, 32)) + 2.0).astype(np.float32)  # rank 1 + offset
    cb = fit(QuantizerSpec.parse(spec), x[:2500], seed=0)
    f = fidelity(x[2500:], cb.decode(encode(cb, x[2500:])))
    assert f["relmse"] < 1e-3 and f["mean_cos"] > 0.999, f


def test_gain_shape_beats_plain_codes_of_the_same_size_when_norms_spread():
    """Tokens = directions (rank 12 in 32-d, offset) x norms spread over two decades, like the
    MiniLM / ViT outlier tokens: plain RQ spends its bits on the long tokens, gain-shape doesn't."""
    rng = np.random.default_rng(2)
    u = rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 32)) + 1.5
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    g = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (3000, 1)))
    x = (u * g).astype(np.float32)
    train, test = x[:2500], x[2500:]
    plain = fit(QuantizerSpec.parse("rq:m=4,beam=2,niter=8"), train, seed=0)
    gs = fit(QuantizerSpec.parse("rq:m=4,beam=2,niter=8,norm=1"), train, seed=0)
    assert gs.m == plain.m == 4 and gs.n_codebooks == 3 and gs.norms.shape == (256,)
    codes = encode(gs, test)
    # the norm code (last) decodes to the token's norm within the log-spaced level step
    np.testing.assert_allclose(gs.norms[codes[:, 3]], np.linalg.norm(test, axis=1), rtol=0.02)
    f_gs, f_plain = fidelity(test, gs.decode(codes)), fidelity(test, plain.decode(encode(plain, test)))
    assert f_gs["mean_cos"] > f_plain["mean_cos"] + 0.02 and f_gs["p5_cos"] > f_plain["p5_cos"], (f_gs, f_plain)


def test_rq_refinement_solves_the_joint_least_squares_problem():
    """The CG solve equals dense least squares (what faiss's retrain_AQ_codebook computes with
    LAPACK) on the fitted values, and refined codebooks code the training sample better."""
    from kdcache.quantize.refine import _cg_solve
    rng = np.random.default_rng(3)
    n, c, k, d = 600, 3, 8, 5
    idx = rng.integers(0, k, (n, c)) + np.arange(c) * k
    x = rng.standard_normal((n, d)).astype(np.float32)
    design = np.zeros((n, c * k))
    design[np.arange(n)[:, None], idx] = 1
    dense = np.linalg.lstsq(design, x, rcond=None)[0]
    got = _cg_solve(torch.from_numpy(idx), torch.from_numpy(x), torch.zeros(c * k, d), c * k, 200).numpy()
    np.testing.assert_allclose(design @ got, design @ dense, atol=1e-3)  # fitted values (B itself is not unique)

    rng = np.random.default_rng(4)
    train = (rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 32))).astype(np.float32)
    err = {}
    for spec in ("rq:m=4,beam=2,niter=8", "rq:m=4,beam=2,niter=8,refine=2"):
        cb = fit(QuantizerSpec.parse(spec), train, seed=0)
        err[spec] = fidelity(train, cb.decode(encode(cb, train)))["relmse"]
    assert err["rq:m=4,beam=2,niter=8,refine=2"] < 0.98 * err["rq:m=4,beam=2,niter=8"], err


def test_spec_parsing_errors():
    from kdcache.quantize.quantizer_spec import QuantizeError
    for bad, msg in [("kmeans:m=4", "method must be one of"), ("pq:m=x", "not key=integer"), ("pq:q=4", "unknown key")]:
        with pytest.raises(QuantizeError, match=msg):
            QuantizerSpec.parse(bad)
    with pytest.raises(QuantizeError, match="must divide the feature dim"):
        QuantizerSpec.parse("pq:m=7").resolve_m(192)
    with pytest.raises(QuantizeError, match="M=48 gives 47 codebooks, which must divide the feature dim 384"):
        QuantizerSpec.parse("opq:m=48,norm=1").resolve_m(384)
    with pytest.raises(QuantizeError, match="norm must be 0 or 1"):
        QuantizerSpec.parse("rq:m=8,norm=2")
    with pytest.raises(QuantizeError, match="sq8: norm=1 applies to pq, opq, pca and rq"):
        QuantizerSpec.parse("sq8:norm=1").resolve_m(384)
    with pytest.raises(QuantizeError, match="opq: refine applies to rq"):
        QuantizerSpec.parse("opq:m=48,refine=2").resolve_m(384)
    assert QuantizerSpec.parse("rq:m=48,norm=1").key(384) == "rq:M=48,beam=4,train_beam=1,norm=1"
    with pytest.raises(QuantizeError, match="100 training tokens for codebooks of 256 entries"):
        fit(QuantizerSpec.parse("pq:m=4"), np.zeros((100, 8), np.float32))
    # faiss's OPQ training crashes the process (SIGSEGV) with fewer points than dimensions: refused first
    x = np.random.default_rng(0).standard_normal((300, 512)).astype(np.float32)
    with pytest.raises(QuantizeError, match="opq: 300 training tokens for 512-dim features; .* at least 512"):
        fit(QuantizerSpec.parse("opq:m=32"), x)


Q = dict(views=4, progress=False, workers=0, batch_size=4)


def test_quantize_during_and_after_extraction_give_the_same_codes(tmp_path, many_shards, vit_spec):
    sample = SampleSpec(train_tokens=256, held_out=32, seed=0, pool=1)
    during, after = str(tmp_path / "during.zarr"), str(tmp_path / "after.zarr")
    extract(many_shards, during, [vit_spec], ExtractOptions(quantize="pq:m=12", quantize_sample=256, quantize_pool=1, seed=0, **Q))
    s = Store.open(during)
    cb = s.read_codebooks("vit", "patch")
    used = cb.attrs["trained_on"]["shards"]
    assert 1 <= len(used) < 6  # trained on a prefix; the other shards were encoded as extracted
    extract(many_shards, after, [vit_spec], ExtractOptions(seed=0, **Q))
    fp16 = {n: Store.open(after).read_features(n, "vit", "patch") for n in Store.open(after).complete_shards()}
    out = quantize_store(after, "vit", QuantizerSpec.parse("pq:m=12"), sample=sample, progress=False)
    assert out["shards_converted"] == 6
    a = Store.open(after)
    np.testing.assert_array_equal(a.read_codebooks("vit", "patch").codebooks, cb.codebooks)
    for name in s.complete_shards():
        np.testing.assert_array_equal(s.array(name, "vit/patch_codes")[:], a.array(name, "vit/patch_codes")[:], err_msg=name)
        assert "vit/patch" not in s.root[f"shards/{name}"] and "vit/patch" not in a.root[f"shards/{name}"]
        # the codes decode to the fp16 features they came from, within the quantizer's error
        dec = cb.decode(a.array(name, "vit/patch_codes")[:])
        assert fidelity(fp16[name].reshape(-1, 192), dec.reshape(-1, 192))["mean_cos"] > 0.8
    # quantizing again with another spec is refused; the same spec is a no-op
    from kdcache.quantize.quantizer_spec import QuantizeError
    with pytest.raises(QuantizeError, match="already quantized with pq:M=12"):
        quantize_store(after, "vit", QuantizerSpec.parse("opq:m=12"), sample=sample, progress=False)
    assert quantize_store(after, "vit", QuantizerSpec.parse("pq:m=12"), sample=sample, progress=False)["shards_converted"] == 0


@pytest.mark.parametrize("spec,c,norm", [("rq:m=8,beam=2,niter=8", 8, False), ("rq:m=9,beam=2,niter=8,norm=1", 8, True)])
def test_quantized_store_decodes_with_plain_zarr_and_numpy(tmp_path, many_shards, vit_spec, spec, c, norm):
    out = str(tmp_path / "q.zarr")
    extract(many_shards, out, [vit_spec], ExtractOptions(seed=0, **Q))
    quantize_store(out, "vit", QuantizerSpec.parse(spec), keep_float=True,
                   sample=SampleSpec(train_tokens=512, held_out=64, pool=1), progress=False)
    root = zarr.open_group(out, mode="r")
    q = root["quantizers/vit/patch"]
    mean, rot, books = q["mean"][:], q["rotation"][:], q["codebooks"][:]
    assert q.attrs["method"] == "rq" and books.shape == (c, 256, 192) and ("norms" in q) == norm
    g = root["shards/demo-000003"]
    codes = g["vit/patch_codes"][:]
    m = c + norm
    assert codes.shape == (6, 4, 4, m) and codes.dtype == np.uint8
    y = books[np.arange(c), codes[..., :c]].sum(-2)  # additive: sum of the selected entries
    x = y @ rot + mean
    if norm:  # gain-shape: the codebooks coded the direction, the last code the norm
        x = q["norms"][:][codes[..., c]][..., None] * x
    cb = Store.open(out).read_codebooks("vit", "patch")
    np.testing.assert_allclose(x, faiss_decode(cb, codes.reshape(-1, m)).reshape(x.shape), rtol=1e-4, atol=1e-4)
    floats = g["vit/patch"][:].astype(np.float32)  # kept: --keep-float
    assert fidelity(floats.reshape(-1, 192), x.reshape(-1, 192))["relmse"] < 0.5
    d = info(Store.open(out))["teachers"]["vit"]["quantizer"]["patch"]
    assert d["method"] == "rq" and d["m"] == m and d["bytes_per_token"] == m and d["compression_vs_fp16"] == 384 / m
    assert 0 < d["relmse"] < 1 and 0 < d["p5_cos"] <= d["mean_cos"] <= 1
    from helpers import verify_store
    assert verify_store(out, many_shards).problems == []


def test_cls_tokens_quantized_separately_and_decoded_by_the_trainer(tmp_path, many_shards, vit_spec):
    out = str(tmp_path / "c.zarr")
    extract(many_shards, out, [vit_spec], ExtractOptions(seed=0, **Q))
    r = quantize_store(out, "vit", QuantizerSpec.parse("sq8"), kind="cls", progress=False,
                       sample=SampleSpec(train_tokens=100, held_out=20, pool=1))
    assert r["shards_converted"] == 6 and r["bytes_per_token"] == 192
    s = Store.open(out)
    g = s.root["shards/demo-000000"]
    assert "vit/cls_codes" in g and "vit/cls" not in g and "vit/patch" in g
    tt = TargetDecoder("vit", s.meta.teachers["vit"], codebooks=stored_codebooks(s, "vit"), normalize="none", stats=None)
    assert tt.paths == {"cls": "vit/cls_codes", "patch": "vit/patch"}
    codes = torch.from_numpy(g["vit/cls_codes"][:2, 0])
    got = tt({"vit/cls_codes": codes, "vit/patch": torch.zeros(2, 4, 192, dtype=torch.float16)})["summary"]
    np.testing.assert_allclose(got.numpy(), s.read_codebooks("vit", "cls").decode(codes.numpy()), rtol=1e-5, atol=1e-5)


def test_cli_quantize_gain_shape_refined_and_bench_rows(tmp_path, many_shards, vit_spec):
    out = str(tmp_path / "g.zarr")
    extract(many_shards, out, [vit_spec], ExtractOptions(seed=0, **Q))
    p = run_cli("quantize", out, "-t", "vit", "--method", "rq", "--m", "9", "--norm", "--refine", "1", "--beam", "2",
                "--sample-tokens", "512", "--no-progress")
    r = json.loads(p.stdout)
    assert r["shards_converted"] == 6 and r["bytes_per_token"] == 9
    # faiss's per-clustering warnings only with -v; one summary line otherwise
    assert "WARNING clustering" not in p.stderr and p.stderr.count("faiss suggests") == 1, p.stderr
    s = Store.open(out)
    cb = s.read_codebooks("vit", "patch")
    assert cb.attrs["spec"] == "rq:M=9,beam=2,train_beam=1,refine=1,norm=1" and cb.n_codebooks == 8 and cb.norms is not None
    assert s.array(s.complete_shards()[0], "vit/patch_codes").shape[-1] == 9
    assert "rq:M=9,beam=2,train_beam=1,refine=1,norm=1" in run_cli("info", out).stdout
    # bench: the norm byte counts in M; product methods take the largest M whose M-1 codebooks divide D
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    table = run_cli("bench", "quantize", "--npy", str(tmp_path / "x.npy"), "--methods", "pq,pq+norm,rq+norm,sq4+norm",
                    "--fractions", "16", "--train-tokens", "2000").stdout
    lines = [line.split("|") for line in table.splitlines() if line.startswith("| ")]
    col = {name.strip(): i for i, name in enumerate(lines[0])}
    rows = {cells[1].strip(): cells for cells in lines[1:]}
    assert rows["pq"][3].strip() == "4" and rows["pq+norm"][3].strip() == "3" and rows["rq+norm"][3].strip() == "4"
    assert 0 < float(rows["rq+norm"][col["relMSE (centred)"]]) <= 1
    assert "norm=1 applies to pq, opq, pca and rq" in rows["sq4+norm"][col["note"]]
    for name in ("pq", "rq+norm"):  # faiss's and the torch encoder's speeds, and their ratio, measured
        for c in ("faiss encode tok/s", "torch cpu tok/s", "torch cpu / faiss"):
            assert float(rows[name][col[c]].split("(")[0].replace(",", "")) > 0, (name, c)
    verbose = run_cli("-v", "bench", "quantize", "--npy", str(tmp_path / "x.npy"), "--methods", "pq", "--fractions", "16",
                      "--train-tokens", "2000")
    assert verbose.stderr.count("WARNING clustering") == 4  # one per codebook's k-means, as faiss prints them


def test_quantize_leaves_a_shard_another_job_holds_and_a_rerun_finishes(tmp_path, vit_store):
    import shutil
    s = str(tmp_path / "s.zarr")
    shutil.copytree(vit_store, s)
    other = Store.open(s, writable=True).leases("another-job")
    other.pid = 1  # a live process on this host that is not us (init)
    assert other.acquire("demo-000001") is None
    spec, sample = QuantizerSpec.parse("sq8"), SampleSpec(train_tokens=128, held_out=16, pool=1)
    r = quantize_store(s, "vit", spec, sample=sample, progress=False)
    assert r["shards_converted"] == 2
    assert "vit/patch_codes" not in Store.open(s).shard_attrs("demo-000001")["digest"]
    other.release("demo-000001")
    r = quantize_store(s, "vit", spec, sample=sample, progress=False)
    assert r["shards_converted"] == 1 and "vit/patch_codes" in Store.open(s).shard_attrs("demo-000001")["digest"]


@pytest.mark.parametrize("command", ["quantize", "extract --quantize"])
def test_without_faiss_quantization_says_in_one_line_what_to_install(tmp_path, vit_store, corpus, vit_spec, monkeypatch,
                                                                     capsys, command):
    """faiss is an extra ([cpu] or [gpu]): where none is installed, quantizing refuses before any
    shard is touched, naming the install command; the store is left as it was."""
    from helpers import cli_call, one_error_line

    from kdcache.quantize import methods
    monkeypatch.setattr(methods, "faiss", None)  # as a core install without the extra imports it
    if command == "quantize":
        import shutil
        url = str(tmp_path / "s.zarr")
        shutil.copytree(vit_store, url)
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        code, _, err = cli_call(monkeypatch, capsys, "quantize", url, "-t", "vit", "--method", "pq", "--m", "8")
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    else:
        code, _, err = cli_call(monkeypatch, capsys, "extract", corpus, "--out", str(tmp_path / "q.zarr"), "-t", vit_spec,
                                "--quantize", "pq:M=8", "--workers", "0", "--no-progress")
    line = one_error_line(err)
    assert code != 0 and "needs faiss" in line and "pip install 'kdcache[cpu]'" in line, line
