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
        self.images_seen = 0  # images through the forward pass (counted: studies report teacher compute)
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
        self.images_seen += int(images.shape[0])
        x = (images.float() - self._mean) / self._std
        # bf16 autocast on CUDA (the fast path); fp32 on CPU, where it is the exact reference.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = self.model.forward_features(x)
            summary, patches = self.model.forward_head(feats, pre_logits=True), self.tap.patches(feats)
            out = self.model.forward_head(feats) if logits else None
        return summary.float(), patches.float(), None if out is None else out.float()

    @property
    def dense_hw(self) -> tuple[int, int] | None:
        """The input of its dense maps (``extract --dense-scale``): scale x its own input."""
        if not self.meta.dense:
            return None
        s = self.meta.dense["scale"]
        return self.data.hw[0] * s, self.data.hw[1] * s

    @torch.inference_mode()
    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """Whole images at ``dense_hw`` (B, 3, H, W) uint8 -> their patch maps (B, GH*GW, D), fp32."""
        return self.features(images)[1]


def create_teacher(spec: ModelSpec | str, *, device: str | torch.device = "cpu", dtype: str = "float16",
                   codec: str = "lz4", logits: int = 0, dense_scale: int = 0) -> Teacher:
    """Build a teacher from a spec; every failure is a one-line ModelSpecError. ``logits``: store
    the top-``logits`` logits of its classifier head too (refused for a teacher without one).
    ``dense_scale``: also a patch map of the whole image at that many times its input (a ViT is
    built with timm's ``dynamic_img_size``, which leaves its output at its own size unchanged;
    a model that cannot run at the larger size is refused)."""
    spec = ModelSpec.parse_teacher(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    model, _ = build_model(spec)
    if dense_scale and hasattr(model, "dynamic_img_size") and not model.dynamic_img_size:
        spec = dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, "dynamic_img_size": True})
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
    if dense_scale:
        hw = (data.hw[0] * dense_scale, data.hw[1] * dense_scale)
        try:
            dense = probe(model, hw, device)
        except Exception as e:  # noqa: BLE001 - whatever the model raises at a size it was not built for
            raise ModelSpecError(f"teacher {spec.name}: --dense-scale {dense_scale}: {spec.model} cannot run at "
                                 f"{hw[0]}x{hw[1]} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        want = (grid[0] * dense_scale, grid[1] * dense_scale)
        if dense.grid != want or dense.layout != tap.layout or dense.prefix_tokens != tap.prefix_tokens:
            raise ModelSpecError(f"teacher {spec.name}: --dense-scale {dense_scale}: at {hw[0]}x{hw[1]} its patch grid "
                                 f"is {list(dense.grid)}, not {list(want)} (scale x {list(grid)})")
        teacher.meta = dataclasses.replace(teacher.meta, dense={"scale": int(dense_scale), "grid": list(want)})
    return teacher


def teacher_from_meta(name: str, m: TeacherMeta, *, device: str | torch.device = "cpu") -> Teacher:
    """A store's teacher, rebuilt live from its recorded metadata (model, weights, preprocessing)
    and checked against the stored weights' fingerprint: what evaluation runs to compare with."""
    value = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    spec = ",".join([f"{name}={m.model}", f"pretrained={str(m.pretrained).lower()}",
                     *([f"checkpoint={m.checkpoint}"] if m.checkpoint else []),
                     *(f"{k}={value(v)}" for k, v in m.model_kwargs.items() if k != "img_size"),
                     f"img_size={m.input_size[1]}", f"mean={':'.join(map(str, m.mean))}", f"std={':'.join(map(str, m.std))}",
                     f"interpolation={m.interpolation}", f"crop_pct={m.crop_pct}"])
    teacher = create_teacher(spec, device=device)
    if teacher.meta.weights_sha256 != m.weights_sha256:
        raise ModelSpecError(f"teacher {name}: the weights built from {m.checkpoint or m.model} are not the ones the store "
                             f"was extracted with (weights fingerprint differs)")
    return teacher
