"""``kdcache export RUN``: the bare student as safetensors, loadable by timm directly.

    timm.create_model(MODEL, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=PATH), **kwargs)

(``num_classes=0``: the student was trained without a classifier.) ``--ema`` exports the EMA
weights; ``--heads`` also writes the distillation heads next to it.
"""
from __future__ import annotations

import json
import os
import shutil

from kdcache.store import KdcacheError


def export(run: str, out: str | None = None, *, ema: bool = False, heads: bool = False) -> dict:
    ckpt = os.path.join(run, "checkpoints", "last")
    src = os.path.join(ckpt, "ema.safetensors" if ema else "student.safetensors")
    if not os.path.exists(src):
        raise KdcacheError(f"{run}: no {'EMA ' if ema else ''}checkpoint ({src} missing)")
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    out = out or os.path.join(run, "student.safetensors")
    shutil.copyfile(src, out)
    result = {"student": out, "model": cfg["student"]}
    if heads:
        result["heads"] = out.replace(".safetensors", "") + ".heads.safetensors"
        shutil.copyfile(os.path.join(ckpt, "heads.safetensors"), result["heads"])
    model, *kw = cfg["student"].split(",")
    kwargs = ", ".join(f"{k}={v}" for k, v in (x.split("=", 1) for x in kw) if k != "pretrained")
    result["load_with"] = (f"timm.create_model({model!r}, pretrained=True, num_classes=0, "
                           f"pretrained_cfg_overlay=dict(file={out!r}){', ' + kwargs if kwargs else ''})")
    return result
