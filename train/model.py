"""The student (any timm model) with per-teacher summary and feature heads.

Heads are MLPs (RADIO/UNIC style; ``depth=0`` is linear) on the student's summary vector and
on each of its patch tokens; the patch predictions are resized (bilinear) from the student's
grid to each teacher's grid. With ``codes`` targets the feature head predicts 256 logits per
codebook instead (MVQ-KD style). Heads are discarded after training unless exported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models import DataConfig, probe


@dataclass(frozen=True)
class HeadSpec:
    hidden: int = 1024
    depth: int = 1  # hidden layers; 0 = linear


@dataclass(frozen=True)
class TeacherTarget:
    """What the heads of one teacher must output."""

    name: str
    dim: int
    grid: tuple[int, int]
    codes_m: int | None = None  # predict codes (M x 256 logits per token) instead of features


def mlp(d_in: int, d_out: int, spec: HeadSpec) -> nn.Module:
    if spec.depth == 0:
        return nn.Linear(d_in, d_out)
    layers, d = [], d_in
    for _ in range(spec.depth):
        layers += [nn.Linear(d, spec.hidden), nn.LayerNorm(spec.hidden), nn.GELU()]
        d = spec.hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


class DistillModel(nn.Module):
    def __init__(self, student: nn.Module, data: DataConfig, targets: list[TeacherTarget], head: HeadSpec):
        super().__init__()
        self.student = student
        self.data = data
        self.tap = probe(student, data.hw)
        self.targets = {t.name: t for t in targets}
        self.summary_heads = nn.ModuleDict({t.name: mlp(self.tap.summary_dim, t.dim, head) for t in targets})
        self.patch_heads = nn.ModuleDict({t.name: mlp(self.tap.dim, t.codes_m * 256 if t.codes_m else t.dim, head)
                                          for t in targets})
        self.register_buffer("mean", torch.tensor(data.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data.std).view(1, 3, 1, 1) * 255, persistent=False)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The distillation heads (``summary.<teacher>...``, ``patch.<teacher>...``): what export
        leaves out unless ``--heads``."""
        out = {f"summary.{k}": v for k, v in self.summary_heads.state_dict().items()}
        out.update({f"patch.{k}": v for k, v in self.patch_heads.state_dict().items()})
        return out

    def load_heads_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.summary_heads.load_state_dict({k[len("summary."):]: v for k, v in state.items() if k.startswith("summary.")})
        self.patch_heads.load_state_dict({k[len("patch."):]: v for k, v in state.items() if k.startswith("patch.")})

    def forward(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B, 3, H, W) -> {teacher: (summary (B, D_t), patches (B, T_t, D_t or M*256))}."""
        x = (images.float() - self.mean) / self.std
        summary, patches = self.tap(self.student, x)
        out = {}
        for name, t in self.targets.items():
            p = self.patch_heads[name](patches)
            out[name] = (self.summary_heads[name](summary), resize_grid(p, self.tap.grid, t.grid))
        return out


def resize_grid(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, Hs*Ws, C) -> (B, Hd*Wd, C), bilinear, when the student and teacher grids differ."""
    if tuple(src) == tuple(dst):
        return tokens
    b, _, c = tokens.shape
    g = tokens.transpose(1, 2).reshape(b, c, *src)
    g = F.interpolate(g.float(), size=tuple(dst), mode="bilinear", align_corners=False).to(tokens.dtype)
    return g.flatten(2).transpose(1, 2)
