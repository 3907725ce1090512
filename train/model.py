"""The student (any timm model) with per-teacher summary and feature heads.

Heads are MLPs (RADIO/UNIC style; ``depth=0`` is linear) on the student's summary vector and
on each of its patch tokens; the patch predictions are resized (bilinear) from the student's
grid to each teacher's grid. With ``codes`` targets the feature head predicts 256 logits per
codebook instead (MVQ-KD style). Heads are discarded after training unless exported.
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.extract.taps import probe
from kdcache.extract.teacher import TeacherSpec, _input_size, build_model


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


def create_student(spec: str) -> tuple[nn.Module, dict, TeacherSpec]:
    """``MODEL[,key=value...]`` (same syntax as --teacher, no NAME=; pretrained defaults to false).
    Random-init weights come from the caller's RNG (``--seed``)."""
    s = TeacherSpec.parse(spec if "=" in spec.split(",")[0] else f"student={spec}", pretrained=False)
    model = build_model(s, init_seed=None, role="student", num_classes=0)
    cfg = timm.data.resolve_data_config(model=model)
    size = _input_size(model, s, cfg)
    data = {"input_size": (3, *size), "mean": tuple(s.preprocess.get("mean", cfg["mean"])),
            "std": tuple(s.preprocess.get("std", cfg["std"])), "interpolation": s.preprocess.get("interpolation", cfg["interpolation"]),
            "model_kwargs": dict(s.model_kwargs), "model": s.model}
    return model, data, s


class DistillModel(nn.Module):
    def __init__(self, student: nn.Module, data: dict, targets: list[TeacherTarget], head: HeadSpec):
        super().__init__()
        self.student = student
        self.data = data
        self.tap = probe(student, tuple(data["input_size"][1:]))
        self.targets = {t.name: t for t in targets}
        self.summary_heads = nn.ModuleDict({t.name: mlp(self.tap.summary_dim, t.dim, head) for t in targets})
        self.patch_heads = nn.ModuleDict({t.name: mlp(self.tap.dim, t.codes_m * 256 if t.codes_m else t.dim, head)
                                          for t in targets})
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1) * 255, persistent=False)

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
