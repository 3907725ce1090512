"""Teachers: a frozen timm model, its preprocessing, and the shape of what it emits.

``create_teacher(spec)`` builds the model (timm hub weights with ``pretrained=True``, or a
local checkpoint), resolves its ``DataConfig``, and declares the feature layout
(``TeacherMeta``: dim, grid, prefix tokens) from a dry run before any image is read, so a
mismatch fails before the first batch. Used by extraction and by online distillation alike.
"""
from __future__ import annotations

import torch

from kdcache.store.meta import TeacherMeta

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

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 on the device -> summary (B, D) and patches (B, T, D), fp32."""
        x = (images.float() - self._mean) / self._std
        # bf16 autocast on CUDA (the fast path); fp32 on CPU, where it is the exact reference.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            summary, patches = self.tap(self.model, x)
        return summary.float(), patches.float()


def create_teacher(spec: ModelSpec | str, *, device: str | torch.device = "cpu", dtype: str = "float16",
                   codec: str = "lz4") -> Teacher:
    """Build a teacher from a spec; every failure is a one-line ModelSpecError."""
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
    return Teacher(spec, model, meta, tap, data, device)
