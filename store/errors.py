"""The error type user mistakes raise, everywhere in kdcache.

It lives in ``store/`` because ``store`` is the one package every other package may import
(``store`` itself imports nothing of ours). The CLI turns a ``KdcacheError`` into one line on
stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""


class KdcacheError(Exception):
    """A user-facing error: bad input, bad options, or a store that does not fit the request."""


class StoreError(KdcacheError):
    """The store is missing, unwritable, corrupt, or incompatible with the request."""


class CorruptShardError(StoreError):
    """A shard's data does not match what was written (``train --skip-corrupt`` skips these)."""


def first_line(e: BaseException) -> str:
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
