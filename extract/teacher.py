"""Teachers: a timm model, its preprocessing, and the shape of what it emits.

``create_teacher(spec)`` builds the model (timm hub weights with ``pretrained=True``, or a
local checkpoint), takes preprocessing from the model's timm data config unless overridden,
and declares the feature layout (``TeacherMeta``: dim, grid, prefix tokens) from a dry run
before any image is read, so a mismatch fails before the first batch.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import timm
import timm.data
import torch

from kdcache.store import KdcacheError, TeacherMeta

from .taps import FeatureTap, probe

# Keys of a --teacher spec that kdcache consumes; everything else goes to timm.create_model.
PREPROCESS_KEYS = ("mean", "std", "interpolation", "crop_pct")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED = {"keys", "views", "shards", "quantizers", "stats"}
INIT_SEED = 0  # weights of pretrained=false teachers


class TeacherError(KdcacheError):
    """A teacher spec, model name or checkpoint that cannot be used."""


@dataclass(frozen=True)
class TeacherSpec:
    """``NAME=MODEL[,key=value...]`` as given to ``--teacher``."""

    name: str
    model: str
    pretrained: bool = True
    checkpoint: str | None = None
    img_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, *, pretrained: bool = True) -> "TeacherSpec":
        """``pretrained`` is the default when the spec does not say (students default to false)."""
        head, *rest = [p.strip() for p in text.split(",") if p.strip()] or [""]
        name, _, model = head.partition("=")
        if not model:
            name, model = re.sub(r"[^A-Za-z0-9_.-]", "_", head), head
        if not model or not NAME_RE.match(name) or name in RESERVED:
            raise TeacherError(f"--teacher {text!r}: expected NAME=MODEL[,key=value...] with NAME of letters, digits, _ . - (not {sorted(RESERVED)})")
        kw, pre, spec = {}, {}, dict(pretrained=pretrained, checkpoint=None, img_size=None)
        for item in rest:
            k, eq, v = item.partition("=")
            if not eq:
                raise TeacherError(f"--teacher {text!r}: {item!r} is not key=value")
            if k in spec:
                spec[k] = _parse_value(v) if k != "checkpoint" else v
            elif k in PREPROCESS_KEYS:
                pre[k] = tuple(float(x) for x in v.split(":")) if k in ("mean", "std") else _parse_value(v)
            else:
                kw[k] = _parse_value(v)
        return cls(name=name, model=model, pretrained=bool(spec["pretrained"]), checkpoint=spec["checkpoint"],
                   img_size=spec["img_size"], model_kwargs=kw, preprocess=pre)


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


class Teacher:
    """A frozen model on a device plus what it needs to turn uint8 crops into features."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, meta: TeacherMeta, tap: FeatureTap, device: torch.device):
        self.spec, self.model, self.meta, self.tap, self.device = spec, model, meta, tap, device
        self.name = spec.name
        self._mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1) * 255

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.meta.input_size[1:])

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 on the device -> summary (B, D) and patches (B, T, D), fp32."""
        x = (images.float() - self._mean) / self._std
        # bf16 autocast on CUDA (the fast path); fp32 on CPU, where it is the exact reference.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            summary, patches = self.tap(self.model, x)
        return summary.float(), patches.float()


def create_teacher(spec: TeacherSpec | str, *, device: str | torch.device = "cpu", dtype: str = "float16",
                   codec: str = "lz4") -> Teacher:
    """Build a teacher from a spec; every failure is a one-line TeacherError."""
    spec = TeacherSpec.parse(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    model = build_model(spec)
    if spec.checkpoint:
        _load_checkpoint(model, spec)
    model.eval().requires_grad_(False).to(device)
    cfg = timm.data.resolve_data_config(model=model)
    size = _input_size(model, spec, cfg)
    pre = {**{k: cfg[k] for k in PREPROCESS_KEYS}, **spec.preprocess}
    tap = probe(model, size, device)
    grid, dim, cls_dim = tap.grid, tap.dim, tap.summary_dim
    meta = TeacherMeta(
        model=spec.model, weights_sha256=weights_sha256(model), input_size=(3, *size),
        mean=tuple(float(x) for x in pre["mean"]), std=tuple(float(x) for x in pre["std"]),
        interpolation=str(pre["interpolation"]), crop_pct=float(pre["crop_pct"]),
        patch_size=(size[0] // grid[0], size[1] // grid[1]), grid=grid, dim=dim, tokens=grid[0] * grid[1],
        prefix_tokens=tap.prefix_tokens, summary="cls" if tap.layout == "tokens" and tap.prefix_tokens else "pool",
        dtype=dtype, codec=codec,
        model_kwargs=dict(spec.model_kwargs, **({"img_size": spec.img_size} if spec.img_size else {})),
        pretrained=spec.pretrained, checkpoint=spec.checkpoint,
    )
    if cls_dim != dim:
        raise TeacherError(f"teacher {spec.name}: summary dim {cls_dim} differs from patch dim {dim}; "
                           f"pass a model whose pre-logits equal its feature width")
    return Teacher(spec, model, meta, tap, device)


def build_model(spec: TeacherSpec, *, init_seed: int | None = INIT_SEED, role: str = "teacher", **extra) -> torch.nn.Module:
    """``timm.create_model`` from a spec; ``extra`` kwargs (e.g. num_classes=0) go to timm.

    ``init_seed``: random-init weights from this seed (teachers: the same in every process);
    None keeps the caller's RNG (students: ``--seed`` decides).
    """
    who = f"{role} {spec.name}" if role == "teacher" else role
    if not timm.is_model(spec.model):
        raise TeacherError(f"{who}: unknown timm model {spec.model!r}")
    kwargs = {**spec.model_kwargs, **extra}
    if spec.img_size:
        kwargs["img_size"] = spec.img_size
    pretrained = spec.pretrained and not spec.checkpoint
    try:
        # A random-init teacher must be the same in every process (re-runs, resumes, ranks):
        # initialise it from a fixed seed, without touching the caller's RNG.
        with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            try:
                return timm.create_model(spec.model, pretrained=pretrained, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e) or not spec.img_size:
                    raise
                kwargs.pop("img_size")  # CNNs take any size; it only sets the input
                return timm.create_model(spec.model, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise TeacherError(f"{who}: timm.create_model({spec.model!r}) rejected {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise TeacherError(f"{who}: cannot load pretrained weights for {spec.model!r} "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass checkpoint=PATH or pretrained=false") from None
        raise TeacherError(f"{who}: cannot build {spec.model!r}: {e}") from None


def _load_checkpoint(model: torch.nn.Module, spec: TeacherSpec) -> None:
    path = spec.checkpoint
    try:
        if path.endswith(".safetensors"):
            import safetensors.torch
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except FileNotFoundError:
        raise TeacherError(f"teacher {spec.name}: checkpoint {path}: no such file") from None
    except Exception as e:
        raise TeacherError(f"teacher {spec.name}: checkpoint {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    for k in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(k), dict):
            state = state[k]
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    bad = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if bad:
        raise TeacherError(f"teacher {spec.name}: checkpoint {path} does not fit {spec.model}: {len(bad)} key(s), first: {bad[0]}")


def _input_size(model, spec: TeacherSpec, cfg: dict) -> tuple[int, int]:
    if spec.img_size:
        s = spec.img_size
        return (s, s) if isinstance(s, int) else tuple(s)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return tuple(pe.img_size)
    return tuple(cfg["input_size"][1:])


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes, sorted by name): identifies the weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
