"""``timm.create_model`` from a spec, local checkpoints, and a fingerprint of the weights.

Loading follows what timm users expect: hub weights with ``pretrained=True``; a local
``.safetensors`` or weights-only torch file with ``checkpoint=PATH`` (``state_dict``/``model``
wrappers and ``module.`` prefixes unwrapped). A checkpoint without classifier weights (what
``kdcache export`` writes, what DINO-style backbones ship) loads with the classifier removed:
kdcache only reads features. Any other missing or unexpected key is refused.
"""
from __future__ import annotations

import hashlib
import re

import timm
import torch

from .spec import ModelSpec, ModelSpecError

INIT_SEED = 0  # weights of pretrained=false teachers: the same in every process


def build_model(spec: ModelSpec, *, init_seed: int | None = INIT_SEED, role: str = "teacher", **extra) -> tuple[torch.nn.Module, dict]:
    """(model, the kwargs timm accepted). ``extra`` kwargs (e.g. num_classes=0) go to timm.

    ``init_seed``: random-init weights from this seed (teachers: the same in every process);
    None keeps the caller's RNG (students: ``--seed`` decides). ``img_size`` is dropped for
    models that do not take it (CNNs take any size; it then only sets the input size).
    """
    who = f"{role} {spec.name}" if role == "teacher" else role
    if not timm.is_model(spec.model):
        raise ModelSpecError(f"{who}: unknown timm model {spec.model!r}")
    kwargs = {**spec.timm_kwargs, **extra}
    pretrained = spec.pretrained and not spec.checkpoint
    try:
        # A random-init teacher must be the same in every process (re-runs, resumes, ranks):
        # initialise it from a fixed seed, without touching the caller's RNG.
        with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            try:
                return timm.create_model(spec.model, pretrained=pretrained, **kwargs), kwargs
            except TypeError as e:
                if "img_size" not in str(e) or "img_size" not in kwargs:
                    raise
                kwargs.pop("img_size")
                return timm.create_model(spec.model, pretrained=pretrained, **kwargs), kwargs
    except TypeError as e:
        raise ModelSpecError(f"{who}: timm.create_model({spec.model!r}) rejected {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        if pretrained:
            raise ModelSpecError(f"{who}: cannot load pretrained weights for {spec.model!r} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                 f"pass checkpoint=PATH or pretrained=false") from None
        raise ModelSpecError(f"{who}: cannot build {spec.model!r} with {kwargs}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def read_state_dict(path: str, who: str) -> dict[str, torch.Tensor]:
    """A checkpoint file -> state dict, never unpickling code."""
    try:
        if path.endswith(".safetensors"):
            import safetensors.torch
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelSpecError(f"{who}: checkpoint {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise ModelSpecError(f"{who}: checkpoint {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    for k in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(k), dict):
            state = state[k]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"{who}: checkpoint {path}: not a state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_checkpoint(model: torch.nn.Module, spec: ModelSpec, *, who: str) -> None:
    """Load ``spec.checkpoint`` into ``model`` strictly, except a classifier the file does not have."""
    path = spec.checkpoint
    state = read_state_dict(path, who)
    missing = set(model.state_dict()) - set(state)
    head = classifier_keys(model)
    if missing and missing <= head and hasattr(model, "reset_classifier"):
        model.reset_classifier(0)  # a backbone checkpoint: features only, as kdcache uses them
    extra = set(state) - set(model.state_dict())
    if extra and getattr(model, "num_classes", None) == 0 and extra <= _named_classifier_keys(model, state):
        state = {k: v for k, v in state.items() if k not in extra}  # a classifier's checkpoint, for a backbone-only model
    result = model.load_state_dict(state, strict=False)
    bad = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if bad:
        raise ModelSpecError(f"{who}: checkpoint {path} does not fit {spec.model}: {len(bad)} key(s), first: {bad[0]}")
    wrong = [k for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape]
    if wrong:
        raise ModelSpecError(f"{who}: checkpoint {path}: {wrong[0]} has another shape than in {spec.model}")


def _named_classifier_keys(model: torch.nn.Module, state: dict) -> set[str]:
    """Keys of ``state`` under the names timm gives the model's classifier (``pretrained_cfg``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in state for n in names if k == n or k.startswith(n + ".")}


def classifier_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (timm's ``pretrained_cfg['classifier']``)."""
    return _named_classifier_keys(model, model.state_dict())


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes, sorted by name): identifies the weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
