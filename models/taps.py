"""Where features come out of a timm model: summary vector and patch-token grid.

Shared by teachers (what is cached) and students (what is trained), so both read a model the
same way: summary = ``forward_head(forward_features(x), pre_logits=True)`` (CLS for ViTs,
pooled for CNNs); patches = the tokens after the prefix (class/register) tokens, or the
feature map flattened row-major, as (B, T, D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class FeatureTap:
    layout: str  # "tokens" | "nchw" | "nhwc"
    prefix_tokens: int
    grid: tuple[int, int]
    dim: int
    summary_dim: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def patches(self, feats: torch.Tensor) -> torch.Tensor:
        if self.layout == "tokens":
            return feats[:, self.prefix_tokens:]
        if self.layout == "nchw":
            return feats.flatten(2).transpose(1, 2)
        return feats.flatten(1, 2)

    def __call__(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summary (B, D), patches (B, T, D)) of ``model`` on normalised input ``x``."""
        feats = model.forward_features(x)
        return model.forward_head(feats, pre_logits=True), self.patches(feats)


@torch.no_grad()
def probe(model, size: tuple[int, int], device="cpu") -> FeatureTap:
    """Run one blank image to learn the output layout, prefix tokens, grid and widths."""
    was_training = model.training
    model.eval()
    feats = model.forward_features(torch.zeros(1, 3, *size, device=device))
    summary_dim = model.forward_head(feats, pre_logits=True).shape[-1]
    model.train(was_training)
    if feats.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        n = feats.shape[1] - prefix
        pe = getattr(model, "patch_embed", None)
        grid = tuple(pe.grid_size) if pe is not None and getattr(pe, "grid_size", None) else (math.isqrt(n), n // max(1, math.isqrt(n)))
        patch = tuple(getattr(pe, "patch_size", ()) or ())
        if grid[0] * grid[1] != n and len(patch) == 2:  # a dynamic-size ViT at another input: the grid of this size
            grid = (size[0] // patch[0], size[1] // patch[1])
        if grid[0] * grid[1] != n:
            raise KdcacheError(f"cannot map {n} tokens of {type(model).__name__} to a grid {grid}")
        return FeatureTap("tokens", prefix, grid, feats.shape[-1], summary_dim)
    if feats.ndim == 4:
        nf = getattr(model, "num_features", None)
        if feats.shape[1] == nf or feats.shape[-1] != nf:
            return FeatureTap("nchw", 0, tuple(feats.shape[2:]), feats.shape[1], summary_dim)
        return FeatureTap("nhwc", 0, tuple(feats.shape[1:3]), feats.shape[-1], summary_dim)
    raise KdcacheError(f"{type(model).__name__}.forward_features gives a {feats.ndim}-d output; expected tokens or a feature map")
