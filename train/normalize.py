"""Target normalisation, by name: ``standardize`` (per channel, default), ``phi-s``, ``none``.

PHI-S (Ranzinger et al., 2024): rotate the centred targets into their PCA basis, then by a
Hadamard matrix, which spreads the variance evenly over every channel, and divide by one
scalar. Every channel then has the same variance and no channel dominates the loss, while the
map stays a rotation (distances are kept up to one scale). Hadamard matrices are built for
D = 2^k * {1, 12, 20} (Sylvester x Paley), which covers ViT widths (192, 384, 768, 1024, 1280...).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdcache.store import KdcacheError



class Normalizer(nn.Module):
    """x -> (x - shift) @ matrix  (matrix diagonal for standardize)."""

    def __init__(self, shift: np.ndarray, matrix: np.ndarray, name: str):
        super().__init__()
        self.name = name
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32), persistent=False)
        self.register_buffer("matrix", torch.as_tensor(matrix, dtype=torch.float32), persistent=False)
        self.diagonal = name == "standardize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() - self.shift
        return x * self.matrix if self.diagonal else x @ self.matrix

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised space -> the teacher's own feature space (for fidelity in teacher units)."""
        y = y.float()
        x = y / self.matrix if self.diagonal else y @ torch.linalg.pinv(self.matrix)
        return x + self.shift


def _identity(stats, dim: int) -> Normalizer:
    return Normalizer(np.zeros(dim), np.ones(dim), "standardize")


def _standardize(stats, dim: int) -> Normalizer:
    std = np.sqrt(np.maximum(np.diag(stats["covariance"]), 1e-12))
    return Normalizer(stats["mean"], 1.0 / std, "standardize")


def _phi_s(stats, dim: int) -> Normalizer:
    lam, u = np.linalg.eigh(stats["covariance"])
    h = hadamard(dim) / np.sqrt(dim)
    alpha = np.sqrt(max(np.maximum(lam, 0).mean(), 1e-12))
    return Normalizer(stats["mean"], (u @ h.T) / alpha, "phi-s")


# name -> (needs statistics, builder)
NORMALIZERS = {"standardize": (True, _standardize), "phi-s": (True, _phi_s), "none": (False, _identity)}


def needs_stats(name: str) -> bool:
    return _lookup(name)[0]


def create_normalizer(name: str, stats: dict | None, dim: int) -> Normalizer:
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
