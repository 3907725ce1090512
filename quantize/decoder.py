"""Codes -> float targets on the training device, in one gather.

Product codes: one ``embedding`` lookup into the concatenated codebooks (codebook m's entries
at rows ``256*m .. 256*m+255``), reshaped to (..., D). Additive codes: ``embedding_bag`` with
mode ``sum`` (gather and sum fused). Then one ``addmm`` applies the inverse rotation and mean;
gain-shape codes (``norm=1``) scale each token by its norm level, one more gather.
The loader moves uint8 codes; floats only exist on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.store.codes import ADDITIVE, Codebooks


class CodeDecoder(nn.Module):
    def __init__(self, cb: Codebooks):
        super().__init__()
        self.additive = cb.kind == ADDITIVE
        self.m, self.c, self.dim = cb.m, cb.n_codebooks, cb.dim
        table = torch.from_numpy(cb.codebooks.reshape(self.c * 256, -1).copy())
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("offsets", torch.arange(self.c, dtype=torch.int64) * 256, persistent=False)
        self.gain_shape = cb.norms is not None
        if self.gain_shape:
            self.register_buffer("norms", torch.from_numpy(cb.norms.copy()), persistent=False)
        self.register_buffer("rotation", torch.from_numpy(cb.rotation.copy()), persistent=False)
        self.register_buffer("mean", torch.from_numpy(cb.mean.copy()), persistent=False)
        self.identity = bool((cb.rotation == torch.eye(cb.dim).numpy()).all())

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


def code_logits_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """MVQ-KD style target: predict each codebook's code with a 256-way cross-entropy.

    logits (..., M, 256), codes (..., M) uint8 -> mean cross-entropy over codebooks and tokens.
    """
    return F.cross_entropy(logits.reshape(-1, 256).float(), codes.reshape(-1).long())
