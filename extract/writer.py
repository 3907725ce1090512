"""A background thread that owns the store shard writers.

The forward loop hands it rows; compression and disk (or object-store) writes happen here,
so the accelerator never waits for them. Errors surface in the caller on its next call.
"""
from __future__ import annotations

import queue
import threading

import torch

from kdcache.store.dtypes import tensor_to_stored


class BackgroundWriter:
    def __init__(self, open_writer, *, transform=None, depth: int = 8):
        """``open_writer(shard_name)`` returns the ShardWriter for a shard's first rows;
        ``transform(rows)`` (numpy) runs here too, e.g. encoding features to codes."""
        self._open_writer = open_writer
        self._transform = transform
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
            except BaseException as e:  # noqa: BLE001 - handed back to the caller thread
                self._error = e

    def _write(self, shard, rows, failed, last, ready):
        if ready is not None:
            ready.synchronize()  # the device->host copies of these rows are done
        w = self._writers.get(shard) or self._writers.setdefault(shard, self._open_writer(shard))
        if rows:
            rows = {k: tensor_to_stored(v) for k, v in rows.items()}
            w.append(self._transform(rows) if self._transform else rows)
        for f in failed:
            w.add_failed(f["key"], f["error"])
        if last:
            self.finished.append((shard, w.finish()))
            del self._writers[shard]
