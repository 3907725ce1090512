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
