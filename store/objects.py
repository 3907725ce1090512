"""A store's objects as bytes, by key: what zarr stores, read and written without zarr.

The store's arrays and groups are zarr's to read and write (``zarr.open_group``, ``create_array``,
``attrs``: its public API). A few reads are below the level of an array: the shard index object,
listing the shard names (one listing, without parsing every shard's ``zarr.json``), and fetching
a block's whole Zarr shard in one request (``store.zarr_shards`` decodes it). They go through
here: plain file reads on a local path (into a buffer the reading thread reuses), fsspec on a URL
(one request per read; fsspec's configuration carries ``--storage-option``). Nothing here depends
on zarr, so a zarr release cannot change it.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from .remote import is_url, local_path

_scratch = threading.local()  # per reading thread: the largest object it has read


class Objects:
    """The objects under a store's root: ``get``, ``put``, ``names`` (what lies under a prefix)."""

    def __init__(self, url: str):
        self.url = url
        self.local = None if is_url(url) else local_path(url)
        self._fs = self._root = None
        self._pid = None

    def _remote(self):
        if self._pid != os.getpid():  # a filesystem (its sessions, its event loop) is not shared across a fork
            import fsspec
            self._fs, self._root = fsspec.core.url_to_fs(self.url)
            self._root = self._root.rstrip("/")
            self._pid = os.getpid()
        return self._fs, self._root

    def get(self, key: str, *, limit: int, reuse: bool = False, into=None) -> np.ndarray | None:
        """The object's bytes as uint8 (a view of this thread's reused buffer with ``reuse``, valid
        until its next ``get``; with ``into``, a local object is read into ``into((size,), uint8)``,
        memory the caller keeps), or None when it does not exist. An object larger than ``limit``
        bytes is refused before it is read (ValueError): hostile metadata cannot size a read."""
        if self.local is not None:
            return _read_local(os.path.join(self.local, key), limit, reuse, into)
        fs, root = self._remote()
        path = f"{root}/{key}"
        try:  # a range from byte 0: the whole object in one GET (a plain read asks its size first)
            data = fs.cat_file(path, start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise ValueError(f"object {key} holds more than {limit} bytes")
        return np.frombuffer(data, dtype=np.uint8)

    def get_range(self, key: str, start: int, end: int | None = None) -> np.ndarray | None:
        """Bytes ``start:end`` of an object as uint8, in one read (one ranged GET); a negative
        ``start`` with no ``end``: its last ``-start`` bytes (a suffix range: no size asked first).
        None when the object does not exist; fewer bytes when it is shorter."""
        if self.local is not None:
            try:
                f = open(os.path.join(self.local, key), "rb", buffering=0)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            with f:
                if start < 0:
                    size = os.fstat(f.fileno()).st_size
                    start, end = max(0, size + start), size
                return np.frombuffer(os.pread(f.fileno(), max(0, end - start), start), dtype=np.uint8)
        fs, root = self._remote()
        try:
            data = fs.cat_file(f"{root}/{key}", start=start, end=end)
        except FileNotFoundError:
            return None
        return np.frombuffer(data, dtype=np.uint8)

    def put(self, key: str, data: bytes) -> None:
        """Write an object whole: locally through a temporary file renamed into place (a reader sees
        the old object or the new one), on object storage in one PUT."""
        if self.local is not None:
            path = os.path.join(self.local, key)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        fs, root = self._remote()
        fs.pipe_file(f"{root}/{key}", data)

    def names(self, prefix: str) -> list[str]:
        """The names directly under ``prefix`` (one listing: one request per 1,000 names on S3)."""
        if self.local is not None:
            try:
                return sorted(os.listdir(os.path.join(self.local, prefix)))
            except FileNotFoundError:
                return []
        fs, root = self._remote()
        try:
            entries = fs.ls(f"{root}/{prefix}", detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def _read_local(path: str, limit: int, reuse: bool, into=None) -> np.ndarray | None:
    """A local object with plain file reads; with ``reuse`` into this thread's reused buffer, with
    ``into`` into the memory it provides.

    zarr's own read of a local object goes through its event-loop thread and a worker thread
    (Python holding the GIL while a loader's decoding thread waits for it) and makes a new bytes
    object per read, whose pages the kernel maps and zeroes every time (24 ms for a 38 MB block,
    7 ms into a reused buffer; measured)."""
    try:
        f = open(path, "rb", buffering=0)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"object of {size} bytes, more than the {limit} kdcache reads at once")
        if into is not None:
            scratch = into((size,), np.uint8)
        elif not reuse:
            return np.frombuffer(f.read(), dtype=np.uint8)
        else:
            scratch = getattr(_scratch, "buffer", None)
            if scratch is None or scratch.size < size:
                scratch = _scratch.buffer = np.empty(size, dtype=np.uint8)
        view, got = memoryview(scratch), 0
        while got < size:
            n = f.readinto(view[got:size])
            if not n:
                break
            got += n
        return scratch[:got]
