"""``kdcache export RUN``: the bare student as safetensors, loadable by timm directly.

    timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=PATH), num_classes=0, **kwargs)

The kwargs are the ones timm accepted when the run built its student (recorded in
``provenance.json``), printed as Python literals, so the line rebuilds exactly that model.
``--ema`` exports the EMA weights; ``--heads`` also writes the distillation heads next to it.
"""
from __future__ import annotations

import os
import shutil

from kdcache.errors import KdcacheError, check_output

from .rundir import RunDir


def export(run: str, out: str | None = None, *, ema: bool = False, heads: bool = False) -> dict:
    rundir = RunDir(run)
    src = rundir.checkpoint_file("ema.safetensors" if ema else "student.safetensors")
    if not os.path.exists(src):
        raise KdcacheError(f"{run}: no {'EMA ' if ema else ''}checkpoint ({src} missing)")
    student = _student(rundir)
    out = os.path.abspath(check_output(out or rundir.file("student.safetensors"), kind="file"))  # (the printed line
    # works from anywhere)
    if heads:
        check_output(out.replace(".safetensors", "") + ".heads.safetensors", kind="file")
    shutil.copyfile(src, out)
    result = {"student": out, "model": student["model"]}
    if heads:
        result["heads"] = out.replace(".safetensors", "") + ".heads.safetensors"
        shutil.copyfile(rundir.checkpoint_file("heads.safetensors"), result["heads"])
    kwargs = "".join(f", {k}={v!r}" for k, v in student["timm_kwargs"].items())
    result["load_with"] = (f"timm.create_model({student['model']!r}, pretrained=True, "
                           f"pretrained_cfg_overlay=dict(file={out!r}){kwargs})")
    return result


def _student(rundir: RunDir) -> dict:
    student = rundir.read_provenance().get("student")
    if not isinstance(student, dict) or "model" not in student or "timm_kwargs" not in student:
        raise KdcacheError(f"{rundir.path}: provenance.json does not name the student; was the run made by this kdcache?")
    return student
