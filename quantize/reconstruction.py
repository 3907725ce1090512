"""How well a quantizer reconstructs tokens it was not trained on: the figures stored with its
codebooks (``kdcache info``), measured by ``kdcache eval store`` and ``kdcache bench quantize``."""
from __future__ import annotations

import numpy as np

from kdcache.store.codes import Codebooks


def reconstruction_fidelity(x: np.ndarray, x_hat: np.ndarray) -> dict:
    """relmse: ||x - x_hat||^2 / ||x - mean(x)||^2 (centred, so a constant offset earns nothing);
    mean_cos / p5_cos: cosine between x and x_hat, averaged and 5th percentile."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    err = ((x - x_hat) ** 2).sum()
    var = ((x - x.mean(0)) ** 2).sum()
    cos = (x * x_hat).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1), 1e-12)
    return {"relmse": float(err / max(var, 1e-30)), "mean_cos": float(cos.mean()), "p5_cos": float(np.percentile(cos, 5)),
            "held_out_tokens": int(len(x))}


def measure(cb: Codebooks, held_out: np.ndarray) -> dict:
    """The figures of ``cb`` on ``held_out`` tokens, encoded as the store encodes them (torch)."""
    from .methods import encode
    return reconstruction_fidelity(held_out, cb.decode(encode(cb, held_out)))
