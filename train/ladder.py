"""``--ladder D1,D2,...``: throw-away projectors from intermediate depths of the student (UNIC).

UNIC ("Universal Classification Models via Multi-teacher Distillation") feeds every teacher's
head not only from the student's last layer: a "ladder" of projectors reads several depths and
their predictions are summed into the head's, so intermediate blocks receive a direct signal
and the last layer need not carry every teacher alone. Here the depths are timm's own
``forward_intermediates`` indices (blocks of a ViT, stages of a CNN; negative counts from the
last), read in the same forward that gives the final features. Per depth and teacher one rung:
LayerNorm over channels, the map resized to the teacher's grid (area-averaged when it is larger,
bilinear otherwise), a linear map to the patch targets, and one from the map's mean to the
summary target. Output layers start at zero, so the ladder starts as a no-op. Discarded at export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError


class Rung(nn.Module):
    def __init__(self, channels: int, out_summary: int, out_patch: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = nn.LayerNorm(channels)
        self.summary, self.patch = nn.Linear(channels, out_summary), nn.Linear(channels, out_patch)
        for layer in (self.summary, self.patch):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (summary (B, out_summary), patches (B, grid tokens, out_patch))."""
        h, w = fmap.shape[-2:]
        if h >= self.grid[0] and w >= self.grid[1]:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)
        else:
            fmap = F.interpolate(fmap, size=self.grid, mode="bilinear", align_corners=False)
        tokens = self.norm(fmap.flatten(2).transpose(1, 2))
        return self.summary(tokens.mean(1)), self.patch(tokens)


class Ladder(nn.Module):
    """Rungs per teacher and depth; ``depths`` as given (timm's indices)."""

    def __init__(self, student: nn.Module, size: tuple[int, int], depths: tuple[int, ...],
                 outputs: dict[str, tuple[int, int, tuple[int, int]]]):
        super().__init__()
        self.depths = list(depths)
        channels = [f.shape[1] for f in probe_intermediates(student, size, self.depths)]
        self.rungs = nn.ModuleDict({t: nn.ModuleList(Rung(c, s, p, g) for c in channels)
                                    for t, (s, p, g) in outputs.items()})

    def forward(self, intermediates: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for t, rungs in self.rungs.items():
            parts = [rung(f) for rung, f in zip(rungs, intermediates)]
            out[t] = (sum(p[0] for p in parts), sum(p[1] for p in parts))
        return out


@torch.no_grad()
def probe_intermediates(student: nn.Module, size: tuple[int, int], depths: list[int]) -> list[torch.Tensor]:
    """The maps ``forward_intermediates`` gives at ``depths`` for one blank image (eval mode)."""
    if not hasattr(student, "forward_intermediates"):
        raise KdcacheError(f"--ladder: {type(student).__name__} has no forward_intermediates in this timm")
    was = student.training
    student.eval()
    try:
        _, maps = student.forward_intermediates(torch.zeros(1, 3, *size), indices=depths)
    except (AssertionError, IndexError, ValueError, RuntimeError) as e:
        raise KdcacheError(f"--ladder {','.join(map(str, depths))}: {type(student).__name__} refuses these depths "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    finally:
        student.train(was)
    if len(maps) != len(depths):
        raise KdcacheError(f"--ladder {','.join(map(str, depths))}: these indices name {len(maps)} distinct depth(s) of "
                           f"{type(student).__name__}; give each depth once")
    if any(m.ndim != 4 for m in maps):
        raise KdcacheError(f"--ladder: {type(student).__name__} gives intermediates that are not (B, C, H, W) maps")
    return maps
