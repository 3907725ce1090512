"""Stored bytes -> normalised float targets, on the training device.

fp16 rows are widened, bf16 bits (int16) are viewed as bfloat16, codes are decoded with one
gather (``CodeDecoder``); then the teacher's normaliser. Nothing float32 crosses from the
loader to the device.
"""
from __future__ import annotations

import torch
from torch import nn

from kdcache.quantize.decoder import CodeDecoder
from kdcache.store import Store, feature_path
from kdcache.store.dtypes import tensor_to_float

from .normalize import create_normalizer, needs_stats
from .stats import target_stats


class TeacherTargets(nn.Module):
    """Turns one teacher's batch entries into {'summary': ..., 'patch' | 'codes': ...}."""

    def __init__(self, store: Store, teacher: str, *, normalize: str, predict_codes: bool, shards=None, rundir=None,
                 write_stats: bool = False, skip_corrupt: bool = False):
        super().__init__()
        self.name = teacher
        meta = store.meta.teachers[teacher]
        q = meta.quantizer or {}
        self.paths = {}
        self.decoders = nn.ModuleDict()
        for kind in ("cls", "patch"):
            if kind in q and not q[kind].get("keep_float"):
                self.paths[kind] = feature_path(teacher, kind, codes=True)
                self.decoders[kind] = CodeDecoder(store.read_codebooks(teacher, kind))
            else:
                self.paths[kind] = feature_path(teacher, kind)
        self.predict_codes = predict_codes and "patch" in self.decoders
        self.codes_m = q["patch"]["m"] if self.predict_codes else None
        self.dtype = meta.dtype
        self.norm = nn.ModuleDict({
            kind: create_normalizer(normalize, target_stats(store, teacher, kind, shards=shards, rundir=rundir, write=write_stats,
                                                            skip_corrupt=skip_corrupt)
                                    if needs_stats(normalize) else None, meta.dim)
            for kind in ("cls", "patch")})

    def _float(self, kind: str, raw: torch.Tensor) -> torch.Tensor:
        if kind in self.decoders:
            return self.decoders[kind](raw)
        return tensor_to_float(raw, self.dtype)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = {"summary": self.norm["cls"](self._float("cls", batch[self.paths["cls"]]))}
        if self.predict_codes:
            out["codes"] = batch[self.paths["patch"]]
        else:
            out["patch"] = self.norm["patch"](self._float("patch", batch[self.paths["patch"]]))
        return out
