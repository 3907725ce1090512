"""Training settings: one frozen dataclass, from a YAML/TOML file and/or CLI options.

CLI options override the file; unset options keep the defaults here (one place). The
resolved config is written to the run directory as JSON, next to a copy of the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from kdcache.store import KdcacheError


@dataclass(frozen=True)
class TrainConfig:
    store: str
    data: str
    student: str
    out: str
    teachers: tuple[str, ...] = ()  # default: every teacher of the store
    teacher_weights: dict = field(default_factory=dict)  # lambda_t, default uniform 1
    epochs: int = 10
    batch_size: int = 64
    workers: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: float = 1.0
    amp: str = "bf16"  # bf16 | none (bf16 autocast works on CPU too)
    ema: float = 0.0  # EMA decay of the student, 0 = off
    seed: int = 0
    device: str = "auto"
    view_choice: str = "epoch"  # epoch | random | first
    shuffle_buffer: int = 256
    color_jitter: float = 0.0  # student-only photometric augmentation strength
    normalize: str = "standardize"  # standardize | phi-s | none
    head_hidden: int = 1024
    head_depth: int = 1
    alpha: float = 0.9
    beta: float = 2.0
    summary_weight: float = 1.0
    patch_weight: float = 1.0
    predict_codes: bool = False  # quantized teachers: 256-way CE per codebook (MVQ-KD) instead of regression
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    stop_at_step: int = 0  # stop (with a checkpoint) after this global step; --resume continues
    resume: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise KdcacheError(f"--config {path}: {e.strerror}") from None
    try:
        if path.endswith(".toml"):
            import tomllib
            d = tomllib.loads(raw.decode())
        else:
            import yaml
            d = yaml.safe_load(raw) or {}
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise KdcacheError(f"--config {path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise KdcacheError(f"--config {path}: expected a mapping of option: value")
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise KdcacheError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return d


def build_config(config_file: str | None, **cli) -> TrainConfig:
    d = read_config_file(config_file) if config_file else {}
    d.update({k: v for k, v in cli.items() if v is not None})
    for k in ("store", "data", "student", "out"):
        if not d.get(k):
            raise KdcacheError(f"--{k} is required (on the command line or in --config)")
    if "teachers" in d:
        d["teachers"] = tuple(d["teachers"])
    return TrainConfig(**d)


def save_config(cfg: TrainConfig, config_file: str | None) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        f.write(cfg.to_json())
    if config_file:
        with open(config_file, "rb") as src, open(os.path.join(cfg.out, "config" + os.path.splitext(config_file)[1]), "wb") as dst:
            dst.write(src.read())
