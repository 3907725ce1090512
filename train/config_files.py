"""A run's configuration as users give it: a YAML or TOML file (``--config``) and the command
line's options, the file's overridden by the command line's, and the options whose text needs
parsing (``--ladder``, ``--teacher-weight``). What the configuration is and what it allows is
``train.config``."""
from __future__ import annotations

from kdcache.errors import KdcacheError

from .config import ConfigError, TrainConfig, flatten


def read_config_file(path: str) -> dict:
    """A YAML or TOML file of options (sections, or options at the top level), by command-line name."""
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
    return flatten(d, where=f"--config {path}")


def build_config(config_file: str | None, **cli) -> TrainConfig:
    """The file's options, overridden by the CLI's (None = not given); validated on construction."""
    d = read_config_file(config_file) if config_file else {}
    d.update({k: v for k, v in cli.items() if v is not None})
    if d.get("online"):
        d.setdefault("store", "")
    return TrainConfig(**d)


def parse_ladder(text: str | None) -> tuple[int, ...] | None:
    """``--ladder 1,2,-2`` -> (1, 2, -2) (None when not given)."""
    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"--ladder {text!r}: expected comma-separated block indices, e.g. 1,2") from None


def parse_teacher_weights(items) -> dict | None:
    """``--teacher-weight NAME=LAMBDA`` options -> {name: lambda} (None when none given)."""
    if not items:
        return None
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--teacher-weight {item!r}: expected NAME=LAMBDA with a number") from None
        if not eq or not name:
            raise ConfigError(f"--teacher-weight {item!r}: expected NAME=LAMBDA")
    return out
