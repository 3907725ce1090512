"""The resolved preprocessing of a model, as one typed object both teachers and students use.

Taken from timm (``resolve_data_config(model=...)``), never by hand; the spec's ``img_size``,
``mean``, ``std``, ``interpolation`` and ``crop_pct`` override it. Teachers record it in the
store (``TeacherMeta``); students use it to size and normalise their input.
"""
from __future__ import annotations

from dataclasses import dataclass

import timm.data

from kdcache.store.meta import INTERPOLATIONS

from .spec import ModelSpec, ModelSpecError


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int, int]  # (3, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @property
    def hw(self) -> tuple[int, int]:
        return (self.input_size[1], self.input_size[2])


def resolve_data_config(model, spec: ModelSpec) -> DataConfig:
    cfg = timm.data.resolve_data_config(model=model)
    if spec.img_size:
        s = spec.img_size
        hw = (s, s) if isinstance(s, int) else tuple(s)
    else:
        pe = getattr(model, "patch_embed", None)
        hw = tuple(pe.img_size) if pe is not None and getattr(pe, "img_size", None) else tuple(cfg["input_size"][1:])
    pre = {**{k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct")}, **spec.preprocess}
    interpolation = str(pre["interpolation"])
    if interpolation not in INTERPOLATIONS:
        raise ModelSpecError(f"{spec.text or spec.model}: timm's interpolation {interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}; pass interpolation=... in the spec")
    return DataConfig(input_size=(3, int(hw[0]), int(hw[1])), mean=tuple(float(x) for x in pre["mean"]),
                      std=tuple(float(x) for x in pre["std"]), interpolation=interpolation,
                      crop_pct=float(pre["crop_pct"]))
