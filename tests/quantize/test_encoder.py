"""The torch encoders against faiss's own encoding of the same stored codebooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.quantize.encoder import TorchEncoder

from kdcache.quantize.methods import faiss_encode, fit

from kdcache.quantize.quantizer_spec import QuantizeError, QuantizerSpec
from kdcache.quantize.reconstruction import reconstruction_fidelity as fidelity


def _data(kind: str, n: int = 6000, d: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((n, d)).astype(np.float32)
    # low rank (8) plus a little noise, with norms spread over a decade (what gain-shape is for)
    x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 0.05 * rng.standard_normal((n, d))
    return (x * np.exp(rng.uniform(-1.2, 1.2, (n, 1)))).astype(np.float32)


@pytest.fixture(scope="module", params=["random", "low-rank"])
def split(request):
    x = _data(request.param)
    return x[:5000], x[5000:]


@pytest.mark.parametrize("spec", ["pq:m=8", "opq:m=8,opq_iter=4", "pca:m=16", "pq:m=9,norm=1", "opq:m=5,norm=1,opq_iter=4"])
def test_product_codes_equal_faiss_codes_exactly(split, spec):
    train, held = split
    cb = fit(QuantizerSpec.parse(spec), train)
    ref = faiss_encode(cb, held)
    got = TorchEncoder(cb)(held)
    assert got.dtype == torch.uint8 and got.shape == ref.shape == (len(held), cb.m)
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("spec", ["sq8", "sq4"])
def test_scalar_codes_equal_faiss_codes_up_to_ties(split, spec):
    """1-d and 2-d subspaces: a value at the midpoint between two levels (to float rounding) is a
    tie either side may take; every other code is equal."""
    train, held = split
    cb = fit(QuantizerSpec.parse(spec), train)
    ref, got = faiss_encode(cb, held), TorchEncoder(cb)(held).numpy()
    assert (got == ref).mean() > 0.999
    y = (held - cb.mean).reshape(len(held), cb.n_codebooks, -1).astype(np.float64)
    for i, j in zip(*np.nonzero(got != ref)):
        books = cb.codebooks[j].astype(np.float64)
        d_got, d_ref = ((y[i, j] - books[got[i, j]]) ** 2).sum(), ((y[i, j] - books[ref[i, j]]) ** 2).sum()
        assert abs(d_got - d_ref) <= 1e-6 * max(1.0, d_ref), (i, j, d_got, d_ref)


@pytest.mark.parametrize("beam", [1, 4, 8])
@pytest.mark.parametrize("norm", [0, 1])
def test_rq_beam_search_matches_faiss(split, beam, norm):
    """Same beam semantics as faiss: >= 99% identical codes, held-out relMSE and cosine equal to
    3 decimals (and never worse by more than rounding)."""
    train, held = split
    cb = fit(QuantizerSpec(method="rq", m=8 + norm, beam=beam, norm=norm), train)
    ref, got = faiss_encode(cb, held), TorchEncoder(cb)(held).numpy()
    assert (got == ref).all(1).mean() >= 0.99
    f_ref, f_got = fidelity(held, cb.decode(ref)), fidelity(held, cb.decode(got))
    for k in ("relmse", "mean_cos", "p5_cos"):
        assert round(f_got[k], 3) == round(f_ref[k], 3), (k, f_got[k], f_ref[k])


def test_rq_wider_beam_never_raises_the_error_and_beam_overrides_the_stored_one(split):
    train, held = split
    cb = fit(QuantizerSpec(method="rq", m=8, beam=1), train)
    errs = [fidelity(held, cb.decode(TorchEncoder(cb, beam=b)(held).numpy()))["relmse"] for b in (1, 4, 16)]
    assert errs[0] >= errs[1] >= errs[2] and errs[0] > errs[2]
    np.testing.assert_array_equal(TorchEncoder(cb, beam=1)(held).numpy(), faiss_encode(cb, held))


def test_codes_do_not_depend_on_batching(split):
    """Extraction encodes a batch at a time, ``kdcache quantize`` a block of rows: same codes."""
    train, held = split
    for spec in ("opq:m=8,opq_iter=4", "rq:m=8,beam=4,norm=1"):
        enc = TorchEncoder(fit(QuantizerSpec.parse(spec), train))
        whole = enc(held).numpy()
        parts = np.concatenate([enc(held[s:s + 37]).numpy() for s in range(0, len(held), 37)])
        np.testing.assert_array_equal(whole, parts)


def test_encoder_accepts_tensors_and_refuses_a_wrong_dim(split):
    train, held = split
    cb = fit(QuantizerSpec.parse("pq:m=8"), train)
    enc = TorchEncoder(cb, "cpu")
    np.testing.assert_array_equal(enc(torch.from_numpy(held).half()).numpy(), enc(held.astype(np.float16).astype(np.float32)).numpy())
    with pytest.raises(QuantizeError, match="dim 32, quantizer pq expects 64"):
        enc(held[:, :32])
