"""Object storage: which locations are URLs, and ``--storage-option key=value`` for every command
taking STORE or DATA.

``is_url`` is the one test of "is this an fsspec URL or a local path" (``file://`` is local).

The options go into fsspec's own configuration (``fsspec.config.conf[protocol]``), the place
``s3fs``, ``gcsfs`` and the others read their defaults from, alongside the environment
(``AWS_*``, ``FSSPEC_S3_*``, ...). So every filesystem kdcache opens, for the store, the
corpus, the writers' leases and in DataLoader workers (which inherit the configuration and
open their own filesystem after the fork), gets them, and they are never part of a store URL,
a store's metadata or a run directory. Nothing here logs or prints a value.
"""
from __future__ import annotations

from kdcache.errors import KdcacheError


def is_url(location: str) -> bool:
    """An fsspec URL of a remote or in-memory filesystem (``s3://``, ``gs://``, ``memory://``); a
    local path or a ``file://`` URL is not."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    """A local path or ``file://`` URL -> the path."""
    return location[len("file://"):] if location.startswith("file://") else location


def parse_storage_options(items) -> dict:
    """``key=value`` strings -> {key: value}; numbers and true/false parsed, ``a.b=v`` nested."""
    out: dict = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise KdcacheError(f"--storage-option {key or item!r}: expected key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(value)
    return out


def parse_value(v: str):
    """A ``key=value`` value from the command line: true/false, none/null, int, float, else the
    string itself (also used for model specs)."""
    low = v.strip().lower()
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


def protocols(urls) -> set[str]:
    """The fsspec protocols of the URLs that are not local paths."""
    return {u.split("://", 1)[0] for u in urls if is_url(u)}


def configure(options: dict, urls) -> None:
    """Apply ``options`` to the protocols of ``urls`` (a local-only command ignores them)."""
    if not options:
        return
    import fsspec.config
    targets = protocols(urls)
    if not targets:
        raise KdcacheError("--storage-option given, but no STORE or DATA here is an fsspec URL (s3://, gs://, ...)")
    for proto in targets:
        conf = fsspec.config.conf.setdefault(proto, {})
        _merge(conf, options)


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
