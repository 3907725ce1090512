"""Teachers: a frozen timm model, its preprocessing, and the shape of what it emits.

``create_teacher(spec)`` builds the model (timm hub weights with ``pretrained=True``, or a
local checkpoint), resolves its ``DataConfig``, and declares the feature layout
(``TeacherMeta``: dim, grid, prefix tokens) from a dry run before any image is read, so a
mismatch fails before the first batch. Used by extraction and by online distillation alike.
"""
from __future__ import annotations

import dataclasses

import torch

from kdcache.store.meta import TeacherMeta, index_dtype

from .create import build_model, load_checkpoint, weights_sha256
from .data_config import DataConfig, resolve_data_config
from .spec import ModelSpec, ModelSpecError
from .taps import FeatureTap, probe


class Teacher:
    """A frozen model on a device plus what it needs to turn uint8 crops into features."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, meta: TeacherMeta, tap: FeatureTap,
                 data: DataConfig, device: torch.device):
        self.spec, self.model, self.meta, self.tap, self.data, self.device = spec, model, meta, tap, data, device
        self.name = spec.name
        self._mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(data.std, device=device).view(1, 3, 1, 1) * 255

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.data.hw

    @property
    def classes(self) -> int:
        """The classifier head's class count; 0 for a teacher without a head."""
        return int(getattr(self.model, "num_classes", 0) or 0)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 on the device -> summary (B, D) and patches (B, T, D), fp32."""
        summary, patches, _ = self.outputs(images)
        return summary, patches

    @torch.inference_mode()
    def outputs(self, images: torch.Tensor, *, logits: bool = False):
        """(summary (B, D), patches (B, T, D), logits (B, C) or None), fp32: what the teacher
        sees, and with ``logits`` what it says (timm's own head: ``forward_head(features)``)."""
        x = (images.float() - self._mean) / self._std
        # bf16 autocast on CUDA (the fast path); fp32 on CPU, where it is the exact reference.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = self.model.forward_features(x)
            summary, patches = self.model.forward_head(feats, pre_logits=True), self.tap.patches(feats)
            out = self.model.forward_head(feats) if logits else None
        return summary.float(), patches.float(), None if out is None else out.float()


def create_teacher(spec: ModelSpec | str, *, device: str | torch.device = "cpu", dtype: str = "float16",
                   codec: str = "lz4", logits: int = 0) -> Teacher:
    """Build a teacher from a spec; every failure is a one-line ModelSpecError. ``logits``: store
    the top-``logits`` logits of its classifier head too (refused for a teacher without one)."""
    spec = ModelSpec.parse_teacher(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    model, _ = build_model(spec)
    if spec.checkpoint:
        load_checkpoint(model, spec, who=f"teacher {spec.name}")
    model.eval().requires_grad_(False).to(device)
    data = resolve_data_config(model, spec)
    tap = probe(model, data.hw, device)
    if tap.summary_dim != tap.dim:
        raise ModelSpecError(f"teacher {spec.name}: summary dim {tap.summary_dim} differs from patch dim {tap.dim}; "
                             f"pass a model whose pre-logits equal its feature width")
    grid = tap.grid
    meta = TeacherMeta(
        model=spec.model, weights_sha256=weights_sha256(model), input_size=data.input_size, mean=data.mean, std=data.std,
        interpolation=data.interpolation, crop_pct=data.crop_pct,
        patch_size=(data.hw[0] // grid[0], data.hw[1] // grid[1]), grid=grid, dim=tap.dim, tokens=tap.tokens,
        prefix_tokens=tap.prefix_tokens, summary="cls" if tap.layout == "tokens" and tap.prefix_tokens else "pool",
        dtype=dtype, codec=codec, model_kwargs=spec.timm_kwargs,
        pretrained=spec.pretrained, checkpoint=spec.checkpoint,
    )
    teacher = Teacher(spec, model, meta, tap, data, device)
    if logits:
        classes = teacher.classes
        if classes == 0:
            raise ModelSpecError(f"teacher {spec.name}: --logits {logits}: {spec.model} has no classifier head "
                                 f"(num_classes=0, or a checkpoint without one); soft labels need one")
        if logits > classes:
            raise ModelSpecError(f"teacher {spec.name}: --logits {logits}: more than its {classes} classes")
        meta = dataclasses.replace(meta, logits={"k": int(logits), "classes": classes, "index_dtype": index_dtype(classes)})
        teacher.meta = meta
    return teacher
