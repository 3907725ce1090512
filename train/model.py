"""The student (any timm model) with per-teacher summary and feature heads.

Heads are MLPs (RADIO/UNIC style; ``depth=0`` is linear) on the student's summary vector and
on each of its patch tokens, or (``kind="transformer"``, DUNE) per teacher a small stack of
transformer blocks over the student's summary and patch tokens together, so the projector can
use relations between patches. With ``shared_adapter`` one learnable projection maps the
student's tokens into a common space that every teacher's head reads (Knowledge Inheritance).
The patch predictions are resized (bilinear) from the student's grid to each teacher's grid.
With ``codes`` targets the feature head predicts 256 logits per codebook instead (MVQ-KD
style). An optional linear classifier on the student's own summary vector serves the task loss.
Three more projectors, each in its own module: ``kind="model-token"`` (``train.spaces``: the
student in every teacher's space, a model token per space, intra- and inter-space blocks),
``ladder`` depths (``train.ladder``: UNIC's projectors from intermediate blocks, summed into each
head's prediction) and ``adapter_rank`` (``train.adapters``: the student frozen, low-rank
adapters beside its layers, folded into its weights at export).
Everything but the student is discarded after training unless exported (``heads_state_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.data_config import DataConfig
from kdcache.models.taps import probe

from .adapters import attach_adapters, merged_state
from .config import HEAD_KINDS
from .ladder import Ladder
from .spaces import ModelTokenSpaces


@dataclass(frozen=True)
class HeadSpec:
    hidden: int = 1024  # MLP hidden width; transformer width; shared adapter width
    depth: int = 1  # MLP hidden layers (0 = linear); transformer blocks
    kind: str = "mlp"  # mlp | transformer | model-token
    heads: int = 4  # transformer, model-token: attention heads
    shared_adapter: bool = False
    ladder: tuple[int, ...] = ()  # depths of the student feeding extra projectors (UNIC); () = none
    adapter_rank: int = 0  # > 0: the student frozen, low-rank adapters of this rank learn (Knowledge Inheritance)


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


class TransformerHead(nn.Module):
    """DUNE's projector: [summary; patches] -> width, + learned positions, ``depth`` ViT blocks,
    LayerNorm, then one linear map for the summary token and one for every patch token."""

    def __init__(self, d_summary: int, d_patch: int, tokens: int, out_summary: int, out_patch: int, spec: HeadSpec):
        super().__init__()
        from timm.models.vision_transformer import Block
        w = spec.hidden
        self.embed_summary, self.embed_patch = nn.Linear(d_summary, w), nn.Linear(d_patch, w)
        self.position = nn.Parameter(torch.zeros(1, 1 + tokens, w))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*[Block(w, spec.heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(w)
        self.summary_out, self.patch_out = nn.Linear(w, out_summary), nn.Linear(w, out_patch)

    def forward(self, summary: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.embed_summary(summary)[:, None], self.embed_patch(patches)], dim=1) + self.position
        x = self.norm(self.blocks(x))
        return self.summary_out(x[:, 0]), self.patch_out(x[:, 1:])


class MlpHead(nn.Module):
    """Per-token MLPs: one on the summary vector, one applied to every patch token."""

    def __init__(self, d_summary: int, d_patch: int, out_summary: int, out_patch: int, spec: HeadSpec):
        super().__init__()
        self.summary, self.patch = mlp(d_summary, out_summary, spec), mlp(d_patch, out_patch, spec)

    def forward(self, summary: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.summary(summary), self.patch(patches)


class SharedAdapter(nn.Module):
    """One linear projection of the student's tokens (summary and patches) into a common space."""

    def __init__(self, d_summary: int, d_patch: int, width: int):
        super().__init__()
        self.tokens = nn.Linear(d_patch, width)
        # the summary vector shares the projection when it lives in the same space as the tokens
        self.summary = None if d_summary == d_patch else nn.Linear(d_summary, width)

    def forward(self, summary: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.summary or self.tokens)(summary), self.tokens(patches)


class DistillModel(nn.Module):
    """``forward`` returns {teacher: (summary, patches)}; it also keeps ``representation`` (the
    student's own summary and patch tokens, what ``--balance mgda`` differentiates against),
    with a task head ``task_logits``, and with ``classify`` the student's own class logits
    ``student_logits`` (soft labels)."""

    def __init__(self, student: nn.Module, data: DataConfig, targets: list[TeacherTarget], head: HeadSpec, *,
                 task_classes: int = 0, classify: bool = False):
        super().__init__()
        if head.kind not in HEAD_KINDS:
            raise KdcacheError(f"--head {head.kind!r}: expected one of {', '.join(HEAD_KINDS)}")
        self.student = student
        self.data = data
        self.tap = probe(student, data.hw)
        # before anything else hooks the student: the adapters must see every forward
        self.backbone_adapters = attach_adapters(student, head.adapter_rank) if head.adapter_rank else None
        self.targets = {t.name: t for t in targets}
        d_summary, d_patch = self.tap.summary_dim, self.tap.dim
        self.adapter = SharedAdapter(d_summary, d_patch, head.hidden) if head.shared_adapter else None
        if self.adapter is not None:
            d_summary = d_patch = head.hidden
        tokens = self.tap.grid[0] * self.tap.grid[1]

        def out_patch(t: TeacherTarget) -> int:
            return t.codes_m * 256 if t.codes_m else t.dim

        def make(t: TeacherTarget) -> nn.Module:
            if head.kind == "transformer":
                return TransformerHead(d_summary, d_patch, tokens, t.dim, out_patch(t), head)
            return MlpHead(d_summary, d_patch, t.dim, out_patch(t), head)
        if head.kind == "model-token":
            self.spaces = ModelTokenSpaces(d_summary, d_patch, tokens, {t.name: (t.dim, out_patch(t)) for t in targets},
                                           width=head.hidden, depth=head.depth, heads=head.heads)
            self.heads = nn.ModuleDict()
        else:
            self.spaces = None
            self.heads = nn.ModuleDict({t.name: make(t) for t in targets})
        self.ladder = (Ladder(student, data.hw, head.ladder, {t.name: (t.dim, out_patch(t), t.grid) for t in targets})
                       if head.ladder else None)
        self.ladder_inputs: list[torch.Tensor] | None = None  # the intermediate maps of the last forward (tests)
        self.task_head = nn.Linear(self.tap.summary_dim, task_classes) if task_classes else None
        self.register_buffer("mean", torch.tensor(data.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.representation: tuple[torch.Tensor, torch.Tensor] | None = None
        self.task_logits: torch.Tensor | None = None
        self.classify = classify  # the student's own classifier (timm's head) learns soft labels
        self.student_logits: torch.Tensor | None = None

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the student (heads, adapter, task classifier): what export leaves
        out unless ``--heads``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_heads_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.heads_state_dict()
        if set(state) != set(mine):
            missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise KdcacheError(f"the checkpoint's heads do not match this run's (missing {missing[:3]}, unexpected {extra[:3]}): "
                               f"resume with the options the run was started with")
        self.load_state_dict({**self.student_state(), **state})

    def student_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("student.")}

    def deployable_student_state(self) -> dict[str, torch.Tensor]:
        """The student as ``export`` and ``eval`` load it: with adapters, folded into its weights."""
        if self.backbone_adapters is None:
            return self.student.state_dict()
        return merged_state(self.student, self.backbone_adapters)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_adapters is not None:
            self.student.eval()  # a frozen backbone: batch-norm statistics and dropout frozen too
        return self

    def forward(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B, 3, H, W) -> {teacher: (summary (B, D_t), patches (B, T_t, D_t or M*256))}."""
        x = (images.float() - self.mean) / self.std
        if self.ladder is not None:
            feats, self.ladder_inputs = self.student.forward_intermediates(x, indices=self.ladder.depths)
        else:
            feats = self.student.forward_features(x)
        summary, patches = self.student.forward_head(feats, pre_logits=True), self.tap.patches(feats)
        self.representation = (summary, patches)
        self.task_logits = self.task_head(summary) if self.task_head is not None else None
        # what the student says: its own head, exactly as timm (and the exported model) computes it
        self.student_logits = self.student.forward_head(feats) if self.classify else None
        if self.adapter is not None:
            summary, patches = self.adapter(summary, patches)
        preds = (self.spaces(summary, patches) if self.spaces is not None else
                 {name: self.heads[name](summary, patches) for name in self.targets})
        out = {name: (s, resize_grid(p, self.tap.grid, self.targets[name].grid)) for name, (s, p) in preds.items()}
        if self.ladder is not None:  # UNIC: every rung's prediction summed into the head's
            rungs = self.ladder(self.ladder_inputs)
            out = {name: (s + rungs[name][0], p + rungs[name][1]) for name, (s, p) in out.items()}
        return out


def resize_grid(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, Hs*Ws, C) -> (B, Hd*Wd, C), bilinear, when the student and teacher grids differ."""
    if tuple(src) == tuple(dst):
        return tokens
    b, _, c = tokens.shape
    g = tokens.transpose(1, 2).reshape(b, c, *src)
    g = F.interpolate(g.float(), size=tuple(dst), mode="bilinear", align_corners=False).to(tokens.dtype)
    return g.flatten(2).transpose(1, 2)
