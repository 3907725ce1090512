"""Quantizer methods, by name: train on a sample with faiss, encode, all decodable by store.codes.

Every method ends as the same stored form (``Codebooks``: mean, rotation, codebooks of 256
entries) so that one gather decodes any of them:

| method | codebooks | rotation | faiss |
|---|---|---|---|
| pq   | product (M, 256, D/M)  | identity              | ProductQuantizer |
| opq  | product                | learned (OPQMatrix)   | OPQMatrix + ProductQuantizer |
| pca  | product                | PCA, eigenvalue-balanced subspaces (cheap OPQ) | ProductQuantizer |
| rq   | additive (M, 256, D)   | identity              | ResidualQuantizer (greedy training, beam-search encoding; ``refine=N``: N rounds of joint least-squares codebook updates, quantize/refine.py) |
| sq8  | product, D x (256, 1)  | identity              | ScalarQuantizer QT_8bit ranges |
| sq4  | product, D/2 x (16x16 grid, 2) | identity      | ScalarQuantizer QT_4bit ranges |

``norm=1`` (pq, opq, pca, rq) makes any of them gain-shape: one of the M bytes codes the
token's L2 norm on 256 log-spaced levels, the other M-1 code the direction x / |x|. Token norms
of real networks spread widely (MiniLM: 0.6 to 13, std/mean 0.57; ViTs have high-norm outlier
tokens), and an MSE quantizer of raw features spends its bits on the large ones; quantizing
directions gives every token the same relative accuracy, and the norm byte costs almost nothing.

faiss trains; encoding runs in torch (quantize/encoder.py) from the stored form alone, on any
device, so a quantizer trained in this process and one read back from a store encode
identically. ``faiss_encode`` is faiss's own encoding, the reference it is tested against.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from kdcache.store.codes import ADDITIVE, PRODUCT, Codebooks

from .quantizer_spec import QuantizeError, QuantizerSpec

try:
    import faiss
except ImportError:  # the core install: training, evaluation and reading stores need no faiss
    faiss = None

INSTALL_FAISS = "pip install 'kdcache[cpu]' (or 'kdcache[gpu]' on a CUDA machine: one faiss build per environment)"
FAISS_MIN_POINTS = 39  # faiss warns, once per k-means run (hundreds of lines for pq), below this per centroid
log = logging.getLogger("kdcache.quantize")


def _quiet(cp) -> None:
    """faiss's own per-clustering warnings only with ``kdcache -v`` (debug logging); otherwise
    kdcache logs one line."""
    if not log.isEnabledFor(logging.DEBUG):
        cp.min_points_per_centroid = 1  # only faiss's warning threshold: the clustering is the same


def require_faiss() -> None:
    """Quantizers are trained by faiss, an optional dependency: a QuantizeError saying what to
    install when it is missing (encoding and decoding codes need no faiss)."""
    if faiss is None:
        raise QuantizeError(f"training a quantizer needs faiss, which is not installed: {INSTALL_FAISS}")


def fit(spec: QuantizerSpec, x: np.ndarray, *, seed: int = 0) -> Codebooks:
    """Train on (N, D) float32 features; returns the stored form (attrs: train_seconds)."""
    require_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    m = spec.resolve_m(d) - spec.norm  # codebooks
    if spec.method not in ("sq8", "sq4") and n < 256:
        raise QuantizeError(f"{spec.method}: {n} training tokens for codebooks of 256 entries; need at least 256 "
                            f"(a larger store, or --sample-tokens)")
    if spec.method == "opq" and n < d:  # faiss's OPQMatrix.train segfaults below this (faiss-cpu 1.15.1)
        raise QuantizeError(f"opq: {n} training tokens for {d}-dim features; learning the rotation needs at least {d} "
                            f"(a larger store, or --sample-tokens)")
    if spec.method not in ("sq8", "sq4") and n < FAISS_MIN_POINTS * 256:
        log.warning("%s: %d training tokens; faiss suggests >= %d for 256-entry codebooks (-v shows its warnings)",
                    spec.method, n, FAISS_MIN_POINTS * 256)
    norms = None
    if spec.norm:
        lengths = np.linalg.norm(x, axis=1)
        norms = norm_levels(lengths)
        x = _directions(x, lengths)
    mean = x.mean(0).astype(np.float32)
    xc = np.ascontiguousarray(x - mean)
    t0 = time.perf_counter()
    codebooks, kind, rotation = METHOD_TRAINERS[spec.method](xc, m, spec, seed)
    secs = time.perf_counter() - t0
    return Codebooks(method=spec.method, kind=kind, mean=mean, rotation=rotation,
                     codebooks=np.ascontiguousarray(codebooks, dtype=np.float32), norms=norms,
                     attrs={"beam": spec.beam, "train_seconds": round(secs, 3), "spec": spec.key(d), "seed": seed})


def _train_scalar(xc, m, spec, seed):
    return _scalar_codebooks(xc, 8 if spec.method == "sq8" else 4), PRODUCT, np.eye(xc.shape[1], dtype=np.float32)


def _train_additive(xc, m, spec, seed):
    return _train_rq(xc, m, spec, seed), ADDITIVE, np.eye(xc.shape[1], dtype=np.float32)


def _train_product(xc, m, spec, seed, rotation=None):
    d = xc.shape[1]
    rotation = np.eye(d, dtype=np.float32) if rotation is None else rotation
    pq = _new_pq(d, m, seed, spec.niter)
    _gpu(pq)
    pq.train(np.ascontiguousarray(xc @ rotation.T))
    return faiss.vector_to_array(pq.centroids).reshape(m, 256, d // m), PRODUCT, rotation


def _train_opq(xc, m, spec, seed):
    d = xc.shape[1]
    opq = faiss.OPQMatrix(d, m)
    opq.niter = spec.opq_iter
    opq.pq = _new_pq(d, m, seed, spec.niter)
    _gpu(opq.pq)
    opq.train(xc)
    return _train_product(xc, m, spec, seed, faiss.vector_to_array(opq.A).reshape(d, d).astype(np.float32))


def _train_pca(xc, m, spec, seed):
    return _train_product(xc, m, spec, seed, _pca_balanced(xc, m))


# method name -> trainer(centred x, codebooks, spec, seed) -> (codebooks, kind, rotation)
METHOD_TRAINERS = {"pq": _train_product, "opq": _train_opq, "pca": _train_pca, "rq": _train_additive,
                   "sq8": _train_scalar, "sq4": _train_scalar}


def norm_levels(norms: np.ndarray) -> np.ndarray:
    """256 log-spaced levels spanning the sample's norms with a 2x margin either side: relative
    step under 2% for any realistic spread (MiniLM: 0.6-13 -> 1.7%), error in |x| under 1%."""
    pos = norms[norms > 0]
    lo, hi = (float(pos.min()) / 2, float(pos.max()) * 2) if len(pos) else (1e-6, 1.0)
    return np.geomspace(lo, max(hi, lo * 1.0001), 256).astype(np.float32)


def _norm_codes(norms: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Nearest level in log space (levels are geometric)."""
    lo, hi = np.log(levels[0]), np.log(levels[-1])
    t = (np.log(np.maximum(norms, levels[0])) - lo) / (hi - lo) * 255
    return np.clip(np.rint(t), 0, 255).astype(np.uint8)


def _directions(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(lengths, 1e-12)[:, None], dtype=np.float32)


def encode(cb: Codebooks, x, *, device="cpu", beam: int | None = None) -> np.ndarray:
    """(N, D) float -> (N, M) uint8 codes, by the torch encoder (quantize/encoder.py) on ``device``."""
    from .encoder import TorchEncoder
    return TorchEncoder(cb, device, beam=beam)(x).cpu().numpy()


def faiss_encode(cb: Codebooks, x: np.ndarray, *, batch: int = 65536) -> np.ndarray:
    """faiss's own encoding of (N, D) features: the reference the torch encoder is tested and
    benchmarked against."""
    require_faiss()
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != cb.dim:
        raise QuantizeError(f"features have dim {x.shape[-1]}, quantizer {cb.method} expects {cb.dim}")
    q = _faiss_encoder(cb)
    c = cb.n_codebooks
    out = np.empty((len(x), cb.m), dtype=np.uint8)
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        if cb.norms is not None:
            lengths = np.linalg.norm(xb, axis=1)
            out[s:s + batch, c] = _norm_codes(lengths, cb.norms)
            xb = _directions(xb, lengths)
        y = np.ascontiguousarray((xb - cb.mean) @ cb.rotation.T, dtype=np.float32)
        out[s:s + batch, :c] = q.compute_codes(y).reshape(len(y), -1)[:, :c]
    return out


def faiss_decode(cb: Codebooks, codes: np.ndarray) -> np.ndarray:
    """faiss's own decode of our codes (the reference the torch decoder is tested against)."""
    require_faiss()
    codes = np.asarray(codes, dtype=np.uint8)
    c = cb.n_codebooks
    y = _faiss_encoder(cb).decode(np.ascontiguousarray(codes[:, :c]))
    x = y @ cb.rotation + cb.mean
    return x if cb.norms is None else cb.norms[codes[:, c]][:, None] * x


def _faiss_encoder(cb: Codebooks):
    d, m = cb.dim, cb.n_codebooks
    if cb.kind == ADDITIVE:
        return _rq_from(cb.codebooks, int(cb.attrs.get("beam", 8)))
    pq = faiss.ProductQuantizer(d, m, 8)
    faiss.copy_array_to_vector(cb.codebooks.ravel(), pq.centroids)
    return pq


def _new_pq(d, m, seed, niter):
    pq = faiss.ProductQuantizer(d, m, 8)
    pq.cp.seed, pq.cp.niter = seed, niter
    _quiet(pq.cp)
    return pq


def refine_codebooks(cb: Codebooks, x: np.ndarray, *, rounds: int, beam: int) -> Codebooks:
    """More refinement rounds for a trained rq quantizer on its training features ``x`` (raw, as
    given to ``fit``): ``fit`` with refine=a then ``refine_codebooks(rounds=b)`` equals refine=a+b."""
    if cb.kind != ADDITIVE:
        raise QuantizeError(f"{cb.method}: refinement applies to rq")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if cb.norms is not None:
        x = _directions(x, np.linalg.norm(x, axis=1))
    xc = np.ascontiguousarray(x - cb.mean)
    books = _refined(xc, cb.codebooks, beam=beam, rounds=rounds)
    spec = QuantizerSpec.parse(cb.attrs["spec"]) if "spec" in cb.attrs else None
    attrs = dict(cb.attrs, beam=beam)
    if spec is not None:
        attrs["spec"] = dataclasses.replace(spec, beam=beam, refine=spec.refine + rounds).describe()
    return dataclasses.replace(cb, codebooks=books, attrs=attrs)


def _train_rq(xc, m, spec, seed):
    d = xc.shape[1]
    rq = faiss.ResidualQuantizer(d, m, 8)
    rq.max_beam_size = spec.train_beam
    rq.cp.seed, rq.cp.niter = seed, spec.niter
    _quiet(rq.cp)
    rq.train_type = faiss.ResidualQuantizer.Train_progressive_dim  # progressive-dim k-means per stage
    if faiss.get_num_gpus() > 0:
        rq.assign_index_factory = faiss.GpuProgressiveDimIndexFactory(faiss.get_num_gpus())
    rq.train(xc)
    books = faiss.vector_to_array(rq.codebooks).reshape(m, 256, d)
    return _refined(xc, books, beam=spec.beam, rounds=spec.refine) if spec.refine else books


def _refined(xc: np.ndarray, books: np.ndarray, *, beam: int, rounds: int) -> np.ndarray:
    """``rounds`` of refinement of (C, 256, D) additive codebooks on centred x, each round's codes
    by the torch beam search (what the store's encoder will compute)."""
    from .encoder import TorchEncoder
    from .refine import refine_additive
    d = books.shape[2]

    def codes(b):
        cb = Codebooks(method="rq", kind=ADDITIVE, mean=np.zeros(d, np.float32), rotation=np.eye(d, dtype=np.float32),
                       codebooks=b, attrs={"beam": beam})
        return TorchEncoder(cb)(xc).numpy()
    return refine_additive(xc, books, codes, rounds=rounds)


def _rq_from(books: np.ndarray, beam: int):
    """A faiss ResidualQuantizer that encodes with the given (C, 256, D) codebooks."""
    c, _, d = books.shape
    rq = faiss.ResidualQuantizer(d, c, 8)
    faiss.copy_array_to_vector(np.ascontiguousarray(books, dtype=np.float32).ravel(), rq.codebooks)
    rq.is_trained = True
    rq.max_beam_size = beam
    return rq


def _scalar_codebooks(xc, bits):
    """Uniform per-dimension levels over faiss ScalarQuantizer's trained [vmin, vmin+vdiff]."""
    d = xc.shape[1]
    sq = faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit if bits == 8 else faiss.ScalarQuantizer.QT_4bit)
    sq.train(xc)
    trained = faiss.vector_to_array(sq.trained).reshape(2, d)
    vmin, vdiff = trained[0], trained[1]
    levels = 1 << bits
    grid = vmin[:, None] + (np.arange(levels)[None, :] + 0.5) / levels * vdiff[:, None]  # (D, levels)
    if bits == 8:
        return grid[:, :, None]
    a, b = grid[0::2], grid[1::2]  # pairs of dims: code = 16 * level_a + level_b
    return np.stack([np.repeat(a, 16, axis=1), np.tile(b, (1, 16))], axis=-1)


def _pca_balanced(xc, m):
    """PCA, then eigen-directions dealt to the M subspaces so each gets a similar product of
    eigenvalues (Ge et al., OPQ's non-parametric init): most of OPQ's gain at PCA's cost."""
    d = xc.shape[1]
    lam, vec = np.linalg.eigh(np.cov(xc.T.astype(np.float64)))
    order = np.argsort(lam)[::-1]
    lam, vec = np.maximum(lam[order], 1e-12), vec[:, order]
    per = d // m
    buckets = [[] for _ in range(m)]
    logprod = np.zeros(m)
    for i in range(d):
        open_ = [j for j in range(m) if len(buckets[j]) < per]
        j = min(open_, key=lambda j: logprod[j])
        buckets[j].append(i)
        logprod[j] += np.log(lam[i])
    return vec[:, [i for b in buckets for i in b]].T.astype(np.float32)


def _gpu(pq):
    if faiss.get_num_gpus() > 0:
        pq.assign_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(pq.dsub))
