"""The errors users see, everywhere in kdcache.

A ``KdcacheError`` is a user-facing error: bad input, bad options, or a store that does not fit
the request. The command line turns one into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback. This module imports nothing, so every package (the
store included) and the command line's start-up can use it.
"""
from __future__ import annotations


class KdcacheError(Exception):
    """A user-facing error: bad input, bad options, or a store that does not fit the request."""


class StoreError(KdcacheError):
    """The store is missing, unwritable, corrupt, or incompatible with the request."""


class CorruptShardError(StoreError):
    """A shard's data does not match what was written (``train --skip-corrupt`` skips these).

    ``shard`` names the shard, so a caller that leaves corrupt shards out knows which one to
    leave out without reading the message."""

    def __init__(self, message: str, *, shard: str | None = None):
        super().__init__(message)
        self.shard = shard


def first_line(e: BaseException) -> str:
    """The first line of an error's message, at most 160 characters (for errors of other libraries
    quoted inside ours)."""
    return (str(e).splitlines() or [""])[0][:160]


def one_line(e: BaseException) -> str:
    """The user-facing line of an error. An error raised in a DataLoader worker comes back
    re-raised with the worker's whole traceback as its message; its last line is the original."""
    msg = str(e).strip()
    if msg.startswith("Caught ") and "Traceback" in msg:
        last = msg.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        msg = rest if sep and "." in name or sep and name.endswith("Error") else last
    return " ".join(msg.split("\n"))


def check_output(path: str, *, kind: str, option: str = "--out") -> str:
    """A local output checked before any work starts, as one ``KdcacheError`` naming the option:
    ``kind`` "file" (it must not be a directory, and its directory must exist and take a new
    file) or "dir" (it must not be a file, and it, or the directory it would be made in, must
    take a new file). Writability is tried, not guessed from permission bits (root passes those,
    /proc does not take files). Returns the path."""
    import os
    import tempfile
    if kind == "file" and os.path.isdir(path):
        raise KdcacheError(f"{option} {path}: is a directory; give a file name")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise KdcacheError(f"{option} {path}: exists and is not a directory")
    probe = path if kind == "dir" and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while kind == "dir" and not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # the nearest directory that exists: it makes the rest
    if not os.path.isdir(probe):
        raise KdcacheError(f"{option} {path}: its directory {probe} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".kdcache-probe-"):
            pass
    except OSError as e:
        raise KdcacheError(f"{option} {path}: cannot write in {probe} ({e.strerror or type(e).__name__})") from None
    return path
