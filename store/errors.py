"""The error type user mistakes raise, everywhere in kdcache.

It lives in ``store/`` because ``store`` is the one package every other package may import
(``store`` itself imports nothing of ours). The CLI turns a ``KdcacheError`` into one line on
stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""


class KdcacheError(Exception):
    """A user-facing error: bad input, bad options, or a store that does not fit the request."""


class StoreError(KdcacheError):
    """The store is missing, unwritable, corrupt, or incompatible with the request."""
