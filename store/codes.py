"""Multi-codebook codes in a store: the numpy definition of decoding, and quantizer I/O.

A quantizer lives at ``quantizers/<teacher>/<tokens>/`` (``Store.read_codebooks``) (tokens: ``patch`` or ``cls``) as
plain arrays: ``mean (D,)``, ``rotation (D, D)``, ``codebooks`` ``(C, 256, D/C)`` for
product methods (pq, opq, pca, sq8, sq4) or ``(C, 256, D)`` for additive ones (rq), and, for
gain-shape quantizers (``norm=1``), ``norms (256,)``: the levels of each token's L2 norm.
Codes are ``<teacher>/<tokens>_codes`` ``(n, K, T, M)`` uint8, M = C (+1 norm code, last).
Any team decodes without kdcache:

    y = concat_c codebooks[c, codes[..., c]]     (product)
    y = sum_c    codebooks[c, codes[..., c]]     (additive)
    x = y @ rotation + mean                      (the encoder quantized (x - mean) @ rotation.T)
    x = norms[codes[..., C]][..., None] * x      (gain-shape only: the codebooks hold x / |x|)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.errors import StoreError

PRODUCT, ADDITIVE = "product", "additive"


@dataclass(frozen=True)
class Codebooks:
    """Everything needed to decode codes, as stored."""

    method: str
    kind: str  # PRODUCT | ADDITIVE
    mean: np.ndarray  # (D,) float32
    rotation: np.ndarray  # (D, D) float32
    codebooks: np.ndarray  # (C, 256, D/C) or (C, 256, D) float32
    attrs: dict
    norms: np.ndarray | None = None  # (256,) float32 norm levels: gain-shape (the codebooks code x / |x|)

    @property
    def m(self) -> int:
        """One-byte codes per token: the codebooks, plus the norm code of gain-shape quantizers."""
        return self.codebooks.shape[0] + (self.norms is not None)

    @property
    def n_codebooks(self) -> int:
        return self.codebooks.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(..., M) uint8 codes -> (..., D) float32, exactly the formula above."""
        codes = np.asarray(codes)
        if codes.shape[-1] != self.m:
            raise StoreError(f"codes have {codes.shape[-1]} codebooks, quantizer {self.method} has {self.m}")
        c = self.n_codebooks
        parts = self.codebooks[np.arange(c), codes[..., :c]]  # (..., C, sub)
        y = parts.sum(-2) if self.kind == ADDITIVE else parts.reshape(*codes.shape[:-1], -1)
        x = y @ self.rotation + self.mean
        if self.norms is not None:
            x = self.norms[codes[..., c]][..., None] * x
        return x.astype(np.float32)


def write_codebooks(group, cb: Codebooks) -> None:
    """Into an empty zarr group: the arrays first, the attributes (which make it visible) last."""
    for name in ("mean", "rotation", "codebooks") + (("norms",) if cb.norms is not None else ()):
        a = np.ascontiguousarray(getattr(cb, name), dtype=np.float32)
        group.create_array(name, shape=a.shape, dtype="float32", chunks=a.shape)[...] = a
    group.attrs.put({**cb.attrs, "method": cb.method, "kind": cb.kind, "m": cb.m, "nbits": 8, "ready": True})


def read_codebooks(group) -> Codebooks | None:
    """The quantizer in a zarr group, or None when it was never finished."""
    attrs = dict(group.attrs)
    if not attrs.get("ready"):
        return None
    return Codebooks(method=attrs["method"], kind=attrs["kind"], mean=group["mean"][:], rotation=group["rotation"][:],
                     codebooks=group["codebooks"][:], attrs=attrs, norms=group["norms"][:] if "norms" in group else None)
