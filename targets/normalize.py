"""Target normalisation, by name: ``standardize`` (per channel, default), ``phi-s``, ``none``.

Each builder turns statistics (mean, covariance) into a map ``x -> (x - shift) @ matrix`` (a
diagonal ``matrix`` for standardize), which ``targets.decoding.Normalizer`` applies on the
device. PHI-S (Ranzinger et al., 2024): rotate the centred targets into their PCA basis, then
by a Hadamard matrix, which spreads the variance evenly over every channel, and divide by one
scalar. Every channel then has the same variance and no channel dominates the loss, while the
map stays a rotation (distances are kept up to one scale). Hadamard matrices are built for
D = 2^k * {1, 12, 20} (Sylvester x Paley), which covers ViT widths (192, 384, 768, 1024, 1280...).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class NormalizerParams:
    """``x -> (x - shift) * matrix`` when ``diagonal`` (matrix (D,)), else ``(x - shift) @ matrix``."""

    name: str
    shift: np.ndarray
    matrix: np.ndarray
    diagonal: bool


def _none(stats, dim: int) -> NormalizerParams:
    return NormalizerParams("none", np.zeros(dim), np.ones(dim), True)


def _standardize(stats, dim: int) -> NormalizerParams:
    std = np.sqrt(np.maximum(np.diag(stats["covariance"]), 1e-12))
    return NormalizerParams("standardize", stats["mean"], 1.0 / std, True)


def _phi_s(stats, dim: int) -> NormalizerParams:
    lam, u = np.linalg.eigh(stats["covariance"])
    h = hadamard(dim) / np.sqrt(dim)
    alpha = np.sqrt(max(np.maximum(lam, 0).mean(), 1e-12))
    return NormalizerParams("phi-s", stats["mean"], (u @ h.T) / alpha, False)


# name -> (needs statistics, builder)
NORMALIZERS = {"standardize": (True, _standardize), "phi-s": (True, _phi_s), "none": (False, _none)}


def needs_stats(name: str) -> bool:
    return _lookup(name)[0]


def normalizer_params(name: str, stats: dict | None, dim: int) -> NormalizerParams:
    return _lookup(name)[1](stats, dim)


def _lookup(name: str):
    try:
        return NORMALIZERS[name]
    except KeyError:
        raise KdcacheError(f"--normalize {name!r}: expected one of {', '.join(NORMALIZERS)}") from None


def hadamard(n: int) -> np.ndarray:
    """A +-1 Hadamard matrix of order n = 2^k * {1, 12, 20}."""
    for base, q in ((1, None), (12, 11), (20, 19)):
        if n % base == 0 and (n // base) & (n // base - 1) == 0:
            h = np.ones((1, 1)) if q is None else _paley(q)
            while h.shape[0] < n:
                h = np.block([[h, h], [h, -h]])
            return h
    raise KdcacheError(f"phi-s: no Hadamard matrix of order {n} here (need 2^k, 12*2^k or 20*2^k); use --normalize standardize")


def _paley(q: int) -> np.ndarray:
    """Paley construction I: order q + 1 for a prime q = 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = lambda a: 0 if a % q == 0 else (1 if a % q in squares else -1)  # noqa: E731
    jac = np.array([[chi(j - i) for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + np.eye(q + 1)
