"""Targets for views the store does not hold, derived on the device from the ones it does.

A store keeps K views per image; a long schedule reuses them. These give a student new views of
a finite store, each with the approximation it makes (``kdcache eval fidelity --derived``
measures it against the teacher run on exactly the student's pixels):

- **sub-views**: a random box inside a stored view. Its patch targets are the stored patch grid
  resampled at the box (``torchvision.ops.roi_align``, the grid's cells as pixels, ``aligned``
  centres); its summary target stays the stored view's (a ViT's CLS token is not a function of
  its patch tokens, and a CNN's pooled vector over a box that keeps most of the view changes
  little; the fidelity figures say how much).
- **CutMix** (a box of another sample pasted, snapped to the first teacher's patch grid) and
  **MixUp** (two samples blended) across the batch: the pasted cells take the other sample's
  patch targets (a cell is pasted when its centre lies in the box: exact for the teacher whose
  grid the box is snapped to), summaries are mixed by the pasted area or the MixUp weight, and
  soft-label losses by the same weight.
- **dense maps**: one patch map per image of the whole image at S times the teacher's input
  (``extract --dense-scale S``); any view's patch targets are cut from it by RoIAlign, as ReLabel
  cuts label maps. Its summary target: a pooling teacher's is the mean of the cut patches (what
  its head computes from its own map); a CLS teacher has none (its summary loss is left out).

Boxes are ``(top, left, height, width)`` in fractions of the frame they cut (a stored view's
crop, or the whole image), already mirrored when the target grid is of a flipped crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from kdcache.errors import KdcacheError


def cut_grid(grid: torch.Tensor, hw: tuple[int, int], boxes: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, T, D) patch tokens on an (h, w) grid -> (B, oh*ow, D): each sample's grid resampled at its
    box (B, 4) = (top, left, height, width) in fractions of the grid, with bilinear RoIAlign
    (adaptive sampling: one point per output cell where the box is the grid, so the whole grid
    comes back exactly; several averaged points per cell where a larger map is shrunk)."""
    b, t, d = grid.shape
    h, w = hw
    if t != h * w:
        raise KdcacheError(f"a grid of {t} tokens is not {h}x{w}")
    maps = grid.float().transpose(1, 2).reshape(b, d, h, w)
    top, left, bh, bw = boxes.float().unbind(-1)
    rois = torch.stack([torch.arange(b, device=grid.device, dtype=torch.float32),
                        left * w, top * h, (left + bw) * w, (top + bh) * h], dim=1)
    out = roi_align(maps, rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return out.flatten(2).transpose(1, 2)  # (B, oh*ow, D)


def flip_grid(grid: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, T, D) tokens of an (h, w) grid, mirrored left-right (the grid of a flipped crop)."""
    b, t, d = grid.shape
    return grid.reshape(b, hw[0], hw[1], d).flip(2).reshape(b, t, d)


def sub_view_targets(target: dict, boxes: torch.Tensor, grid: tuple[int, int]) -> dict:
    """A teacher's decoded targets {'summary', 'patch', ...} of stored views -> those of sub-boxes."""
    return {**target, "patch": cut_grid(target["patch"], grid, boxes, grid)}


def dense_targets(dense: torch.Tensor, dense_hw: tuple[int, int], boxes: torch.Tensor, flips: torch.Tensor,
                  grid: tuple[int, int], pooled_summary: bool) -> dict:
    """Patch targets of views (boxes in image fractions, flips 0/1) cut from whole-image dense maps
    (B, GH*GW, D), at the teacher's grid; the summary as the patches' mean for a pooling teacher,
    else None (no summary target for this view)."""
    patch = cut_grid(dense, dense_hw, boxes, grid)
    flipped = flips.bool()
    if flipped.any():
        patch = torch.where(flipped[:, None, None], flip_grid(patch, grid), patch)
    return {"patch": patch, "summary": patch.mean(1) if pooled_summary else None}


@dataclass(frozen=True)
class Mix:
    """One batch's mix: sample i takes sample ``perm[i]``'s ``box`` (CutMix, fractions of the
    student's crop, snapped to a grid) or is blended with it by ``lam`` (MixUp). ``lam`` is the
    weight of sample i's own targets (for CutMix: 1 - the pasted area)."""

    kind: str  # "cutmix" | "mixup"
    perm: torch.Tensor
    lam: float
    box: tuple[float, float, float, float] | None = None  # (top, left, height, width)


def draw_mix(batch_size: int, *, cutmix: float, mixup: float, grid: tuple[int, int], seed: int, step: int,
             device) -> Mix | None:
    """This step's mix (seeded by seed and step: a resumed run mixes as before), or None. With
    both, a batch is CutMix with probability ``cutmix`` and MixUp otherwise; CutMix alone with
    probability ``cutmix``. The CutMix area is uniform (timm's Beta(1, 1)), the box snapped to
    ``grid`` cells (at least one); MixUp's weight is Beta(mixup, mixup)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 17) % (1 << 62))
    u = float(torch.rand((), generator=g))
    if batch_size < 2 or (cutmix <= 0 and mixup <= 0):
        return None
    use_cutmix = cutmix > 0 and u < cutmix
    if not use_cutmix and mixup <= 0:
        return None
    perm = torch.randperm(batch_size, generator=g).to(device)
    if not use_cutmix:
        return Mix("mixup", perm, _beta(g, mixup))
    gh, gw = grid
    area = float(torch.rand((), generator=g))  # pasted area ~ U(0, 1)
    ratio = float(torch.empty(()).uniform_(-0.2877, 0.2877, generator=g).exp())  # aspect in [3/4, 4/3]
    ch = max(1, min(gh, round(gh * (area * ratio) ** 0.5)))
    cw = max(1, min(gw, round(gw * (area / ratio) ** 0.5)))
    top = int(torch.randint(0, gh - ch + 1, (), generator=g))
    left = int(torch.randint(0, gw - cw + 1, (), generator=g))
    box = (top / gh, left / gw, ch / gh, cw / gw)
    return Mix("cutmix", perm, 1.0 - box[2] * box[3], box)


def _beta(g: torch.Generator, alpha: float) -> float:
    """A Beta(alpha, alpha) draw from the step's generator (two gammas; torch's Beta takes no generator)."""
    a = _gamma(g, alpha)
    b = _gamma(g, alpha)
    return a / (a + b)


def _gamma(g: torch.Generator, alpha: float) -> float:
    """Marsaglia-Tsang gamma(alpha) from uniform/normal draws of ``g`` (alpha < 1 boosted)."""
    import math
    boost = 1.0
    if alpha < 1:
        boost = float(torch.rand((), generator=g)) ** (1.0 / alpha)
        alpha += 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn((), generator=g))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=g))
        if math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v * boost


def mix_pixels(images: torch.Tensor, mix: Mix) -> torch.Tensor:
    """A batch of (B, 3, H, W) crops (any dtype) mixed as ``mix`` says, at their own resolution."""
    other = images[mix.perm]
    if mix.kind == "mixup":
        out = images.float() * mix.lam + other.float() * (1 - mix.lam)
        return out.round().to(images.dtype) if not images.is_floating_point() else out.to(images.dtype)
    h, w = images.shape[-2:]
    top, left, bh, bw = mix.box
    r0, r1 = round(top * h), round((top + bh) * h)
    c0, c1 = round(left * w), round((left + bw) * w)
    out = images.clone()
    out[..., r0:r1, c0:c1] = other[..., r0:r1, c0:c1]
    return out


def mix_targets(target: dict, mix: Mix, grid: tuple[int, int]) -> dict:
    """A teacher's decoded targets of the unmixed samples -> those of the mixed ones: CutMix
    pastes the cells whose centre lies in the box, MixUp blends; summaries by ``lam``."""
    out = dict(target)
    other_patch = target["patch"][mix.perm]
    if mix.kind == "mixup":
        out["patch"] = target["patch"] * mix.lam + other_patch * (1 - mix.lam)
    else:
        gh, gw = grid
        top, left, bh, bw = mix.box
        ys = (torch.arange(gh, device=other_patch.device) + 0.5) / gh
        xs = (torch.arange(gw, device=other_patch.device) + 0.5) / gw
        inside = ((ys >= top) & (ys < top + bh))[:, None] & ((xs >= left) & (xs < left + bw))[None, :]
        out["patch"] = torch.where(inside.reshape(1, gh * gw, 1), other_patch, target["patch"])
    if target.get("summary") is not None:
        out["summary"] = target["summary"] * mix.lam + target["summary"][mix.perm] * (1 - mix.lam)
    return out
