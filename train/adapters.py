"""``--frozen-backbone``: a pretrained student kept frozen while low-rank adapters learn the teachers.

After "Knowledge Inheritance for Vision Foundation Models": a pretrained backbone (a DINOv2 ViT,
or here the shipped EfficientNet-Lite0) keeps what it knows, bit for bit, while small adapters
learn the other teachers' knowledge; each teacher is reached through its own head from one shared
space (``--shared-adapter``) in a normalised target space (``--normalize phi-s``), so that no
teacher dominates by feature magnitude.

The adapters are LoRA's: beside every linear layer and every ungrouped 1x1 convolution of the
backbone (its classifier excepted), ``x -> up(down(x))`` of rank ``--adapter-rank`` is added to the
layer's output (a forward hook), ``up`` starting at zero so training starts from the pretrained
function exactly. Batch-norm statistics stay frozen too (the backbone runs in eval mode). Because
the adapter of a layer is linear in the layer's input, it folds into the layer's weight,
``W + up @ down``: the exported student (``merged_state``) is a plain timm model of the same
architecture, so ``kdcache export`` still leaves only the student, and it loads in timm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError


def adaptable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1))


class LowRank(nn.Module):
    """The adapter of one layer: ``up @ down`` of rank r, ``up`` zero at the start."""

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        d_in, d_out = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else (layer.in_channels,
                                                                                                 layer.out_channels)
        self.down = nn.Parameter(torch.empty(rank, d_in).uniform_(-1, 1) / math.sqrt(d_in))
        self.up = nn.Parameter(torch.zeros(d_out, rank))
        self.stride = None if isinstance(layer, nn.Linear) else layer.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.stride is None:
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down[:, :, None, None], stride=self.stride), up[:, :, None, None])

    def delta(self) -> torch.Tensor:
        return self.up.float() @ self.down.float()


def attach_adapters(student: nn.Module, rank: int) -> nn.ModuleDict:
    """Freeze ``student`` and hook a ``LowRank`` beside each adaptable layer; the adapters, by layer
    name (dots as ``__``), to be owned by the caller (they are not the student's parameters)."""
    classifier = student.get_classifier() if hasattr(student, "get_classifier") else None
    skip = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    adapters = nn.ModuleDict()
    for name, layer in student.named_modules():
        if id(layer) in skip or not adaptable(layer):
            continue
        adapter = LowRank(layer, rank)
        adapters[name.replace(".", "__")] = adapter
        layer.register_forward_hook(lambda module, args, out, adapter=adapter: out + adapter(args[0]))
    if not len(adapters):
        raise KdcacheError(f"--frozen-backbone: {type(student).__name__} has no linear layer or 1x1 convolution to adapt")
    for p in student.parameters():
        p.requires_grad_(False)
    return adapters


def merged_state(student: nn.Module, adapters: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """The student's state with every adapter folded into its layer's weight: a plain timm model."""
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    for name, adapter in adapters.items():
        key = name.replace("__", ".") + ".weight"
        w = state[key]
        state[key] = (w.float() + adapter.delta().detach().reshape(w.shape)).to(w.dtype)
    return state
