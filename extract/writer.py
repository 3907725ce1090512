"""A background thread that owns the store shard writers.

The forward loop hands it rows; compression and disk (or object-store) writes happen here,
so the accelerator never waits for them. Errors surface in the caller on its next call.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from kdcache.errors import KdcacheError, StoreError
from kdcache.store.dtypes import STORAGE


class WriteError(StoreError):
    """Writing a shard failed (the shard is left incomplete)."""


class BackgroundWriter:
    def __init__(self, open_writer, *, on_finish=None, depth: int = 8):
        """``open_writer(shard_name)`` returns the ShardWriter for a shard's first rows;
        ``on_finish(shard_name)`` runs once a shard is complete (releasing its lease)."""
        self._open_writer = open_writer
        self._on_finish = on_finish
        self._writers = {}
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.finished: list[tuple[str, dict]] = []
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def put(self, shard: str, rows: dict | None, *, failed=(), last: bool = False, ready: torch.cuda.Event | None = None):
        """Queue rows (numpy or CPU tensors, path -> array) for ``shard``; ``last`` finishes it."""
        self._raise()
        self._queue.put((shard, rows, list(failed), last, ready))

    def close(self) -> list[tuple[str, dict]]:
        """Wait for every queued write; returns (shard, attrs) of the shards finished."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        return self.finished

    def abandon(self) -> None:
        """After a failure elsewhere: stop the thread without finishing any shard (they stay
        incomplete, and the next run rewrites them)."""
        if self._thread.is_alive():
            self._error = self._error or WriteError("abandoned")
            self._queue.put(None)
            self._thread.join()

    def _raise(self):
        if self._error is not None:
            raise self._error

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure; the caller re-raises
            try:
                self._write(*item)
            except KdcacheError as e:
                self._error = e
            except Exception as e:  # noqa: BLE001 - disk full, permission lost, a failing object store: one line
                self._error = WriteError(f"shard {item[0]}: writing failed ({type(e).__name__}: "
                                         f"{getattr(e, 'strerror', None) or str(e).splitlines()[0] if str(e) else ''}); "
                                         f"the shard stays incomplete and the next run rewrites it")

    def _write(self, shard, rows, failed, last, ready):
        if ready is not None:
            ready.synchronize()  # the device->host copies of these rows are done
        w = self._writers.get(shard) or self._writers.setdefault(shard, self._open_writer(shard))
        if rows:
            rows = {k: tensor_to_stored(v) for k, v in rows.items()}
            w.append(rows)
        for f in failed:
            w.add_failed(f["key"], f["error"])
        if last:
            self.finished.append((shard, w.finish()))
            del self._writers[shard]
            if self._on_finish is not None:
                self._on_finish(shard)


def tensor_to_stored(t) -> np.ndarray:
    """A CPU tensor in its storage dtype -> the numpy array the store writes. numpy has no
    bfloat16: bf16 values are written as their uint16 bits (``store.dtypes``)."""
    if not isinstance(t, torch.Tensor):
        return t
    held = STORAGE.get(str(t.dtype).removeprefix("torch."))
    if held is not None and held.as_bits:  # bfloat16: its uint16 bits
        return t.view(getattr(torch, held.zarr)).numpy()
    return t.numpy()
