"""Stored bytes -> normalised float targets, on the training device.

The loader hands over a teacher's rows as stored: float16, float32, bfloat16 as its raw uint16
bits (Zarr has no bfloat16), uint8 codes, and a classifier teacher's top-K soft labels (values in
the storage dtype, class indices, the log-sum-exp). Here, on the device, floats are widened (bf16 bits
viewed as bfloat16), codes are decoded with one gather (``CodeDecoder``), and the teacher's
normaliser maps them into the space the losses are computed in. Nothing float32 crosses from
the loader to the device. The statistics behind the normaliser are handed in by the caller
(``targets.stats`` finds them); nothing here reads or writes a run directory.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.store.codes import ADDITIVE, Codebooks
from kdcache.store.dtypes import STORAGE
from kdcache.store.meta import LOGIT_ARRAYS, TOKEN_KINDS, TeacherMeta, dense_path, feature_path, logits_path

from .derive import dense_targets, sub_view_targets
from .normalize import NormalizerParams, normalizer_params

TORCH_DTYPES = {name: getattr(torch, d.torch) for name, d in STORAGE.items()}  # store.dtypes: the one table


def to_float(raw: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored rows of logical ``dtype`` as they left the loader (bf16: uint16 bits) -> float32."""
    if STORAGE[dtype].as_bits:
        return raw.view(TORCH_DTYPES[dtype]).float()
    return raw.float()


class Normalizer(nn.Module):
    """x -> (x - shift) @ matrix (matrix diagonal for standardize and none)."""

    def __init__(self, params: NormalizerParams):
        super().__init__()
        self.name, self.diagonal = params.name, params.diagonal
        self.register_buffer("shift", torch.as_tensor(params.shift, dtype=torch.float32), persistent=False)
        self.register_buffer("matrix", torch.as_tensor(params.matrix, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() - self.shift
        return x * self.matrix if self.diagonal else x @ self.matrix

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised space -> the teacher's own feature space (for fidelity in teacher units)."""
        y = y.float()
        x = y / self.matrix if self.diagonal else y @ torch.linalg.pinv(self.matrix)
        return x + self.shift


def normalizers(name: str, stats: dict | None, dim: int) -> nn.ModuleDict:
    """{'cls', 'patch'} -> Normalizer, from statistics {kind: {mean, covariance, ...}} (None: none needed)."""
    return nn.ModuleDict({kind: Normalizer(normalizer_params(name, stats[kind] if stats else None, dim)) for kind in TOKEN_KINDS})


class CodeDecoder(nn.Module):
    """Codes -> floats in one gather: the store's numpy decoding rule (``store.codes``) in torch.

    Product codes: one ``embedding`` lookup into the concatenated codebooks (codebook m's entries
    at rows ``256*m .. 256*m+255``), reshaped to (..., D). Additive codes: ``embedding_bag`` with
    mode ``sum`` (gather and sum fused). Then one ``addmm`` applies the inverse rotation and mean;
    gain-shape codes (``norm=1``) scale each token by its norm level, one more gather."""

    def __init__(self, cb: Codebooks):
        super().__init__()
        self.additive = cb.kind == ADDITIVE
        self.m, self.c, self.dim = cb.m, cb.n_codebooks, cb.dim
        self.register_buffer("table", torch.from_numpy(cb.codebooks.reshape(self.c * 256, -1).copy()), persistent=False)
        self.register_buffer("offsets", torch.arange(self.c, dtype=torch.int64) * 256, persistent=False)
        self.gain_shape = cb.norms is not None
        if self.gain_shape:
            self.register_buffer("norms", torch.from_numpy(cb.norms.copy()), persistent=False)
        self.register_buffer("rotation", torch.from_numpy(cb.rotation.copy()), persistent=False)
        self.register_buffer("mean", torch.from_numpy(cb.mean.copy()), persistent=False)
        self.identity = bool(np.array_equal(cb.rotation, np.eye(cb.dim, dtype=cb.rotation.dtype)))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., M) uint8 on any device -> (..., D) float32 on that device."""
        lead = codes.shape[:-1]
        codes = codes.reshape(-1, self.m).long()
        idx = codes[:, :self.c] + self.offsets
        if self.additive:
            y = F.embedding_bag(idx, self.table, mode="sum")
        else:
            y = F.embedding(idx, self.table).reshape(idx.shape[0], self.dim)
        y = torch.addmm(self.mean, y, self.rotation) if not self.identity else y + self.mean
        if self.gain_shape:
            y = y * self.norms[codes[:, self.c]].unsqueeze(1)
        return y.reshape(*lead, self.dim)


class TargetDecoder(nn.Module):
    """One teacher of a store: its batch entries (stored bytes) -> {'summary', 'patch' | 'codes'}
    and, with ``logits``, 'logits': {'values' (B, k) float32, 'indices' (B, k) int64, 'lse' (B,)}.

    ``codebooks``: kind -> the store's quantizer, for token kinds stored as codes only;
    ``stats``: kind -> statistics for the normaliser (None when ``normalize`` needs none);
    ``predict_codes``: hand the patch codes through untouched (the student predicts them);
    ``logits``: read the teacher's stored top-K soft labels too (``logits_top``: only the first N)."""

    def __init__(self, name: str, meta: TeacherMeta, *, codebooks: dict[str, Codebooks], normalize: str,
                 stats: dict | None, predict_codes: bool = False, logits: bool = False, logits_top: int = 0,
                 dense: bool = False):
        super().__init__()
        self.name, self.dtype = name, meta.dtype
        self.grid = tuple(meta.grid)
        self.paths = {kind: feature_path(name, kind, codes=kind in codebooks) for kind in TOKEN_KINDS}
        # --dense-views: the whole-image map instead of the stored views' arrays (targets.derive cuts it)
        self.dense_grid = tuple(meta.dense["grid"]) if dense else None
        self.pooled_summary = meta.summary == "pool"
        if dense:
            self.paths = {"dense": dense_path(name, codes="patch" in codebooks)}
        self.logit_paths = {part: logits_path(name, part) for part in LOGIT_ARRAYS} if logits else {}
        self.gives_logits = bool(logits)
        self.logits_top = logits_top  # the first N of the stored top-K (sorted): the rest joins the tail
        self.decoders = nn.ModuleDict({kind: CodeDecoder(cb) for kind, cb in codebooks.items()})
        self.predict_codes = predict_codes and "patch" in self.decoders
        self.codes_m = codebooks["patch"].m if self.predict_codes else None
        self.norm = normalizers(normalize, stats, meta.dim)

    def _float(self, kind: str, raw: torch.Tensor) -> torch.Tensor:
        if kind in self.decoders:
            return self.decoders[kind](raw)
        return to_float(raw, self.dtype)

    @property
    def read_paths(self) -> list[str]:
        """Every stored array the loader must deliver for this teacher."""
        return [*self.paths.values(), *self.logit_paths.values()]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.dense_grid is not None:
            cut = dense_targets(self._float("patch", batch[self.paths["dense"]]), self.dense_grid, batch["dense_box"],
                                batch["dense_flip"], self.grid, self.pooled_summary)
            summary = cut["summary"]
            return {"patch": self.norm["patch"](cut["patch"]),
                    "summary": None if summary is None else self.norm["cls"](summary)}
        out = {"summary": self.norm["cls"](self._float("cls", batch[self.paths["cls"]]))}
        if self.predict_codes:
            out["codes"] = batch[self.paths["patch"]]
        else:
            out["patch"] = self.norm["patch"](self._float("patch", batch[self.paths["patch"]]))
            if "sub_box" in batch:  # --sub-views: the box's patch targets, resampled from the stored grid
                out = sub_view_targets(out, batch["sub_box"], self.grid)
        if self.logit_paths:
            values, indices, lse = (batch[self.logit_paths[part]] for part in LOGIT_ARRAYS)
            top = self.logits_top or values.shape[-1]
            out["logits"] = {"values": to_float(values, self.dtype)[..., :top], "indices": indices.long()[..., :top],
                             "lse": lse.float()}
        return out


def stored_codebooks(store, teacher: str) -> dict[str, Codebooks]:
    """The quantizers of the token kinds a store keeps as codes only (floats not kept)."""
    q = store.meta.teachers[teacher].quantizer or {}
    return {kind: store.read_codebooks(teacher, kind) for kind in TOKEN_KINDS if kind in q and not q[kind].get("keep_float")}
