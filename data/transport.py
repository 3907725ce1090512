"""Batches and how they cross to the trainer: the last stages of the loader.

``collate`` makes a batch of samples (keys as a list, every other field stacked by torch's
``default_collate``); ``SharedBatches`` is the training DataLoader's ``collate_fn``: each worker
stacks its batches into shared memory it reuses, and a batch crosses to the trainer as a handle
to memory the trainer maps once (``release_batch`` hands it back). ``training_loader`` is the
DataLoader every training run, evaluation and benchmark streams through.
"""
from __future__ import annotations

import logging
import math
import os
import threading

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from kdcache.errors import KdcacheError
from kdcache.store.lease import pid_alive

from .pixels import StoredView, batch_buffer, decode_views

log = logging.getLogger("kdcache.data")


class TransportError(KdcacheError):
    pass


def collate(samples: list[dict], into: dict[str, torch.Tensor] | None = None) -> dict:
    """Samples -> a batch: keys as a list, a store's view pixels decoded into the batch
    (``data.pixels.decode_views``), every other field through torch's ``default_collate``
    (tensors stacked, ints and floats made one tensor), which in a DataLoader worker stacks
    straight into shared memory. ``into``: tensors of the batch's shapes to put those fields in
    instead (``SharedBatches``)."""
    out = {"key": [s["key"] for s in samples]}
    for k in samples[0]:
        if k in out:
            continue
        values = [s[k] for s in samples]
        if isinstance(values[0], StoredView):  # a store's view pixels: decoded here, into the batch
            out[k] = decode_views(values, into.get(k) if into else None)
        elif into and k in into:
            out[k] = (torch.stack(values, out=into[k]) if isinstance(values[0], torch.Tensor)
                      else into[k].copy_(torch.tensor(values, dtype=into[k].dtype)))
        else:
            out[k] = default_collate(values)
    return out


class BatchSlot:
    """Which of a worker's reused batch buffers a batch was collated into (``SharedBatches``), with
    the worker's flags, shared with the trainer: 1 while the batch is out, 0 once released. The
    copy the trainer receives releases the buffer once: when ``release_batch`` is called, or when
    the batch (this slot, its ``"slot"``) is dropped, whichever comes first. A batch's tensors are
    therefore the buffer's while the batch dict lives; a batch dropped unconsumed (the DataLoader
    drops the batches in flight when an epoch is cut short, as a rank with more batches than the
    others does) hands its buffer back."""

    def __init__(self, flags: torch.Tensor, index: int, *, receiver: int | None = None):
        self.flags, self.index = flags, index  # int32 flags, one per buffer, in shared memory
        self._receiver = receiver  # the process that received it (``_received_batch``): only there does it release

    def release(self) -> None:
        if self._receiver == os.getpid():  # not the worker's own copy, nor one a fork inherited
            self._receiver = None
            self.flags[self.index] = 0

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit torch may be gone; the worker is then gone too
            pass


def release_batch(batch: dict) -> None:
    """Done with ``batch``: its worker may collate a later batch into the same shared memory.
    Call once nothing reads the batch's host tensors any more (after the step that used them;
    a pinned copy, as ``pin_memory`` makes, is the consumer's own); dropping the batch does the
    same. Once per batch: a second call does nothing. Batches collated without a buffer (in the
    trainer's process, or when every buffer was out) are left alone."""
    slot = batch.pop("slot", None)
    if isinstance(slot, BatchSlot):
        slot.release()


class SharedBatches:
    """The training DataLoader's ``collate_fn``: ``collate``, into shared memory each worker
    reuses, sent to the trainer as a handle to memory it already maps.

    ``default_collate`` stacks a worker's batch into new shared-memory segments, one per field,
    which the kernel zeroes and maps in page by page and frees when the trainer drops the batch:
    with 148 KiB of fp16 targets per sample (ViT-S/16) about 0.13 ms of kernel time per sample in
    the worker, over a quarter of what decoding and cutting a small image takes there. And every
    segment crosses to the trainer by its file descriptor, which torch passes over a connection
    to a thread of the worker, one per field per batch (measured: ``docs/benchmarks.md#loading``).
    Here each worker keeps up to ``buffers`` batches of shared memory (every field but the keys)
    and collates a batch into one of the same shapes that the trainer has handed back
    (``release_batch``, or the batch dropped: ``BatchSlot``); its ``slot`` says which. A buffer's
    descriptors cross once, with the first batch in it; the trainer keeps that buffer mapped
    (``_received_batch``), and every later batch in it crosses as (worker, buffer, keys). A batch
    that finds no free buffer, and no room for another (every one out: a consumer that keeps its
    batches), is collated as ``collate`` does. A buffer is written again only after its release,
    so a batch kept is never overwritten. In the trainer's own process (no workers) it is
    ``collate``: nothing crosses processes."""

    def __init__(self, buffers: int = 8):
        self.buffers = buffers
        self._pid = None  # the worker process the buffers below belong to
        self._flags: torch.Tensor | None = None
        self._slots: list[tuple[dict, dict[str, torch.Tensor]]] = []  # (shapes, tensors) per buffer
        self._sent: set[int] = set()  # buffers whose memory the trainer has been sent

    def __call__(self, samples: list[dict]):
        if get_worker_info() is None:
            return collate(samples)
        if self._pid != os.getpid():  # first batch of this worker (a fork copies its parent's state)
            self._pid, self._slots, self._sent = os.getpid(), [], set()
            self._flags = torch.zeros(self.buffers, dtype=torch.int32).share_memory_()
        first = samples[0]
        shapes = {k: _batch_shape(v, len(samples)) for k, v in first.items() if k != "key"}
        shapes = {k: v for k, v in shapes.items() if v is not None}
        index = self._free_slot(shapes)
        if index is None:
            return collate(samples)
        return _BufferedBatch(collate(samples, into=self._slots[index][1]), self, index)

    def _crossing(self, batch: dict, index: int) -> tuple:
        """What crosses to the trainer for a batch in buffer ``index``: (worker, buffer, the fields
        not in it, the buffer's tensors and flags the first time it crosses, else None)."""
        tensors, shared = self._slots[index][1], None
        if index not in self._sent:
            self._sent.add(index)
            shared = (tensors, self._flags)
        return self._pid, index, {k: v for k, v in batch.items() if k not in tensors}, shared

    def _free_slot(self, shapes: dict) -> int | None:
        """A released buffer of these shapes, marked out; a new one while fewer than ``buffers``
        exist; else None."""
        flags = self._flags.numpy()
        for i, (held, _) in enumerate(self._slots):
            if flags[i] == 0 and held == shapes:
                flags[i] = 1
                return i
        if len(self._slots) == self.buffers or not shapes:
            return None
        self._slots.append((shapes, {k: _shared_buffer(*spec) for k, spec in shapes.items()}))
        flags[len(self._slots) - 1] = 1
        return len(self._slots) - 1


def _shared_buffer(shape: tuple[int, ...], dtype: torch.dtype, views: bool) -> torch.Tensor:
    """A field's buffer: ``views``, a batch of stored views (channels-last: ``data.pixels.batch_buffer``)."""
    if views:
        n, _, h, w = shape
        return batch_buffer(n, h, w, lambda hwc: _shared_empty(hwc, dtype))
    return _shared_empty(shape, dtype)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """As ``default_collate`` allocates in a worker: typed shared storage, then the shape. Out of
    shared memory (``/dev/shm`` full: a container's 64 MB default) is one line saying what to do."""
    like = torch.empty(0, dtype=dtype)
    try:
        return like.new(like._typed_storage()._new_shared(math.prod(shape))).resize_(shape)
    except (RuntimeError, OSError) as e:
        text = str(e)
        if "No space left" not in text and "unable to write to file" not in text and "Cannot allocate" not in text:
            raise
        mb = math.prod(shape) * like.element_size() / 2**20
        raise TransportError(f"out of shared memory (/dev/shm) for a {mb:.0f} MB part of a batch: a DataLoader worker "
                             f"keeps up to 8 batches there; make /dev/shm larger (docker --shm-size, --ipc=host) or "
                             f"lower --workers or --batch-size") from None


def _batch_shape(value, batch: int) -> tuple[tuple[int, ...], torch.dtype, bool] | None:
    """(shape, dtype, a batch of stored views) of a field of ``batch`` samples as ``collate`` makes
    it; None for a field not kept in a buffer (not a tensor, int or float)."""
    if isinstance(value, torch.Tensor):
        return (batch, *value.shape), value.dtype, False
    if isinstance(value, StoredView):
        return (batch, *value.shape), torch.uint8, True
    if isinstance(value, (int, float)):  # the dtypes default_collate gives them
        dtype = torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int) else torch.float64
        return (batch,), dtype, False
    return None


class _BufferedBatch:
    """A batch a worker collated into buffer ``index`` (``SharedBatches``), as it crosses to the
    trainer: pickled (in the worker's queue thread, in the order batches are sent) with the
    buffer's tensors and flags the first time, as just (worker, buffer) after that; the trainer
    unpickles it into the batch dict (``_received_batch``)."""

    def __init__(self, batch: dict, buffers: SharedBatches, index: int):
        self.batch, self.buffers, self.index = batch, buffers, index

    def __reduce__(self):
        return _received_batch, self.buffers._crossing(self.batch, self.index)


_MAPPED: dict[tuple[int, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}  # (worker pid, buffer) -> (tensors, flags)
_MAPPED_LOCK = threading.Lock()  # two DataLoaders may unpickle at once (a pin-memory thread each)


def _received_batch(pid: int, index: int, fields: dict, shared) -> dict:
    """The trainer's side of ``_BufferedBatch``: the batch dict over the buffer's tensors, mapped
    here when its first batch came (``shared``) and kept while the worker lives (the buffers of
    workers that have exited are forgotten when a new worker's first buffer arrives)."""
    with _MAPPED_LOCK:
        if shared is not None:
            if not any(p == pid for p, _ in _MAPPED):
                gone = {p for p, _ in _MAPPED if not pid_alive(p)}
                for key in [k for k in _MAPPED if k[0] in gone]:
                    del _MAPPED[key]
            _MAPPED[(pid, index)] = shared
        mapped = _MAPPED.get((pid, index))
    if mapped is None:
        raise TransportError(f"a batch from worker {pid} names buffer {index}, whose memory never reached the trainer")
    tensors, flags = mapped
    return {**fields, **tensors, "slot": BatchSlot(flags, index, receiver=os.getpid())}


def training_loader(dataset: IterableDataset, *, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """The DataLoader training streams through (``train.fit``; ``kdcache bench load`` measures it):
    workers kept from epoch to epoch, four batches ahead each, batches collated into reused shared
    memory (``SharedBatches``): hand each back with ``release_batch`` once done with it. Nothing is
    dropped here: each worker's run is whole batches but for the rank's last one (``data.partition``),
    which the split has already decided to keep, pad or drop."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=SharedBatches(), pin_memory=pin_memory,
                      drop_last=False, prefetch_factor=4 if workers else None, persistent_workers=workers > 0)


def stop_workers(loader: DataLoader) -> None:
    """Shut the loader's persistent workers down now, in this process. After an error, the live
    iterator would otherwise stay referenced by the traceback and its workers be reaped later, with
    timeouts; a loader merely dropped is collected whenever, possibly inside a worker another loader
    forked meanwhile, which cannot shut them down."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        try:
            iterator._shutdown_workers()
        except RuntimeError as e:
            # a worker that dies while being shut down (after another one's error: torch's SIGCHLD
            # handler raises mid-join) must not replace the error that stopped the run
            log.debug("loader shutdown: %s", e)
    loader._iterator = None
