"""Run-directory checkpoints: safetensors for weights, tensors-only torch files for the rest.

The layout is ``RunDir``'s: ``student.safetensors`` is always the deployable student (what
``export`` and ``eval`` load); a run with a frozen backbone and adapters also keeps the backbone
as it was (``backbone.safetensors``) for resuming, the adapters living with the heads. Optimizer
and trainer state are saved with torch.save and loaded with ``weights_only=True`` (no pickle of
code). Written to a temporary directory, then
renamed, so a crash never leaves a half-written ``last``.
"""
from __future__ import annotations

import json
import os
import shutil

import safetensors.torch
import torch

from kdcache.errors import KdcacheError

from .rundir import RunDir

BACKBONE = "backbone.safetensors"


def save(run: RunDir, *, model, optimizer, scheduler, ema, state: dict) -> str:
    final = run.checkpoint
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    safetensors.torch.save_file(_contiguous(model.deployable_student_state()), os.path.join(tmp, "student.safetensors"))
    if model.backbone_adapters is not None:
        safetensors.torch.save_file(_contiguous(model.student.state_dict()), os.path.join(tmp, BACKBONE))
    safetensors.torch.save_file(_contiguous(model.heads_state_dict()), os.path.join(tmp, "heads.safetensors"))
    if ema is not None:
        safetensors.torch.save_file(_contiguous(ema.module.state_dict()), os.path.join(tmp, "ema.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(run: RunDir, *, model, optimizer, scheduler, ema) -> dict | None:
    path = run.checkpoint
    if not run.has_checkpoint():
        return None
    frozen = model.backbone_adapters is not None
    if frozen != os.path.exists(os.path.join(path, BACKBONE)):
        raise KdcacheError(f"{path}: the checkpoint was {'not ' if frozen else ''}made with --frozen-backbone and this run "
                           f"is{'' if frozen else ' not'}: resume with the options the run was started with")
    student = BACKBONE if frozen else "student.safetensors"
    model.student.load_state_dict(safetensors.torch.load_file(os.path.join(path, student)))
    model.load_heads_state_dict(safetensors.torch.load_file(os.path.join(path, "heads.safetensors")))
    if ema is not None and os.path.exists(os.path.join(path, "ema.safetensors")):
        ema.module.load_state_dict(safetensors.torch.load_file(os.path.join(path, "ema.safetensors")))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["torch_rng"])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def read_position(run: RunDir) -> dict | None:
    """Where the last checkpoint stopped: {epoch, step_in_epoch, global_step, remaining} (remaining:
    the positions of the interrupted epoch not yet delivered, or None at an epoch's end), without
    loading any weights; None when the run has none. A checkpoint of an earlier kdcache (no
    positions) restarts its interrupted epoch from the beginning, with a warning."""
    if not run.has_checkpoint():
        return None
    path = run.checkpoint_file("state.json")
    try:
        with open(path) as f:
            state = json.load(f)
        position = {k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position.values()):
            raise ValueError("epoch and steps are not non-negative integers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KdcacheError(f"--resume: {path}: not a checkpoint position ({e})") from None
    position["remaining"] = state.get("remaining")
    if position["remaining"] is None and position["step_in_epoch"]:
        import logging
        logging.getLogger("kdcache.train").warning(
            "%s was written by an earlier kdcache, without the epoch's position: epoch %d restarts from its beginning",
            path, position["epoch"])
        position["step_in_epoch"] = 0
    return position


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}
