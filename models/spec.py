"""Model specs as the CLI takes them: ``NAME=MODEL[,key=value...]`` (teachers), ``MODEL[,...]`` (students).

Keys kdcache consumes: ``pretrained``, ``checkpoint``, ``img_size`` and the preprocessing
overrides ``mean``/``std`` (``a:b:c``), ``interpolation``, ``crop_pct``; every other key goes to
``timm.create_model`` (numbers and true/false parsed). Values are validated here, so a typo is
one line naming the option, before any model is built.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from kdcache.errors import KdcacheError
from kdcache.store.meta import INTERPOLATIONS
from kdcache.store.remote import parse_value

PREPROCESS_KEYS = ("mean", "std", "interpolation", "crop_pct")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED = {"keys", "views", "shards", "quantizers", "stats", ".", ".."}


class ModelSpecError(KdcacheError):
    """A teacher or student spec that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``name`` is the teacher's name in the store (students: ``student``)."""

    name: str
    model: str
    pretrained: bool = True
    checkpoint: str | None = None
    img_size: int | tuple[int, int] | None = None
    model_kwargs: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    text: str = ""

    @classmethod
    def parse_teacher(cls, text: str) -> "ModelSpec":
        """``NAME=MODEL[,key=value...]``; ``pretrained`` defaults to true (timm hub weights)."""
        head, rest = _split(text, "--teacher")
        name, eq, model = head.partition("=")
        if not eq or not name or not model:
            raise ModelSpecError(f"--teacher {text!r}: expected NAME=MODEL[,key=value...] (e.g. dino=vit_small_patch14_dinov2)")
        if not NAME_RE.match(name) or name in RESERVED:
            raise ModelSpecError(f"--teacher {text!r}: NAME must be letters, digits, _ . - and not one of {sorted(RESERVED)}")
        return cls._build(text, "--teacher", name, model, rest, pretrained=True)

    @classmethod
    def parse_student(cls, text: str) -> "ModelSpec":
        """``MODEL[,key=value...]``; ``pretrained`` defaults to false (random init from --seed)."""
        head, rest = _split(text, "--student")
        if "=" in head:
            raise ModelSpecError(f"--student {text!r}: expected MODEL[,key=value...] (no NAME=)")
        return cls._build(text, "--student", "student", head, rest, pretrained=False)

    @classmethod
    def _build(cls, text, option, name, model, items, *, pretrained):
        kw, pre, spec = {}, {}, {"pretrained": pretrained, "checkpoint": None, "img_size": None}
        for item in items:
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or not k or not v.strip():
                raise ModelSpecError(f"{option} {text!r}: {item!r} is not key=value")
            if k == "checkpoint":
                spec[k] = v
            elif k in spec:
                spec[k] = parse_value(v)
            elif k in PREPROCESS_KEYS:
                pre[k] = _preprocess_value(text, option, k, v)
            else:
                kw[k] = parse_value(v)
        if not isinstance(spec["pretrained"], bool):
            raise ModelSpecError(f"{option} {text!r}: pretrained must be true or false")
        size = spec["img_size"]
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise ModelSpecError(f"{option} {text!r}: img_size must be a positive integer, got {size!r}")
        return cls(name=name, model=model, pretrained=spec["pretrained"], checkpoint=spec["checkpoint"],
                   img_size=size, model_kwargs=kw, preprocess=pre, text=text)

    @property
    def timm_kwargs(self) -> dict:
        """What goes to ``timm.create_model`` besides ``pretrained``."""
        return {**self.model_kwargs, **({"img_size": self.img_size} if self.img_size else {})}


def _split(text: str, option: str) -> tuple[str, list[str]]:
    parts = [p.strip() for p in str(text).split(",")]
    if not parts[0]:
        raise ModelSpecError(f"{option} {text!r}: empty model spec")
    return parts[0], [p for p in parts[1:] if p]


def _preprocess_value(text, option, key, v):
    if key in ("mean", "std"):
        try:
            vals = tuple(float(x) for x in v.split(":"))
        except ValueError:
            vals = ()
        if len(vals) != 3 or (key == "std" and min(vals) <= 0):
            raise ModelSpecError(f"{option} {text!r}: {key} must be three numbers a:b:c{' > 0' if key == 'std' else ''}, got {v!r}")
        return vals
    if key == "interpolation":
        if v not in INTERPOLATIONS:
            raise ModelSpecError(f"{option} {text!r}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {v!r}")
        return v
    try:
        pct = float(v)
    except ValueError:
        pct = 0.0
    if not 0 < pct <= 1:
        raise ModelSpecError(f"{option} {text!r}: crop_pct must be a number in (0, 1], got {v!r}")
    return pct
