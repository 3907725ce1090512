"""Training batches collated into shared memory each worker reuses once the trainer releases it
(``data.transport.SharedBatches``): the same batches as plain ``collate``, the memory reused, and a
batch that is kept never overwritten."""
from __future__ import annotations

import os
import pickle
import subprocess
from multiprocessing import resource_sharer

import pytest
import torch
from helpers import store_stream

from kdcache.data import transport as loader_module
from kdcache.data.transport import BatchSlot, SharedBatches, collate, release_batch, training_loader

TENSORS = ("image", "view", "label", "vit/cls", "vit/patch", "stream", "offset")


def _stream(store_url, corpus, workers: int):
    return store_stream(store_url, corpus, ("vit/cls", "vit/patch"), workers=workers)


def _expected(store_url, corpus, epoch: int, batch_size: int) -> list[dict]:
    """The epoch's batches collated in this process from the same stream (one worker's split)."""
    stream = _stream(store_url, corpus, workers=1)
    stream.set_epoch(epoch)
    samples = list(stream)
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def _copy(batch: dict) -> dict:
    """The batch's values, not its buffer: the copy does not hold the batch's ``slot``."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "slot"}


class _Writes:
    """A batch slot's shared flags with the trainer's writes to them recorded."""

    def __init__(self, flags: torch.Tensor):
        self.flags, self.writes = flags, []

    def __getitem__(self, i):
        return self.flags[i]

    def __setitem__(self, i, value):
        self.writes.append((i, value))
        self.flags[i] = value


def _same(got: dict, want: dict) -> None:
    assert got["key"] == want["key"]
    for k in TENSORS:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_released_batches_are_stacked_into_the_same_buffers_and_equal_plain_collate(vit_store, corpus):
    stream = _stream(vit_store, corpus, workers=1)
    loader = training_loader(stream, batch_size=2, workers=1)
    slots = []
    for epoch in range(2):  # the workers persist: their buffers too
        stream.set_epoch(epoch, following=epoch + 1 if epoch == 0 else None)
        got = []
        for batch in loader:
            slot = batch["slot"]
            assert isinstance(slot, BatchSlot) and int(slot.flags[slot.index]) == 1  # out while the trainer has it
            got.append(_copy(batch))
            slots.append(slot.index)
            # the release writes 0 to the shared flag: recorded here, since reading the flag back races the
            # worker, which may take the freed buffer for its next batch at once (and set it to 1 again)
            slot.flags = flags = _Writes(slot.flags)
            release_batch(batch)
            assert "slot" not in batch and flags.writes == [(slot.index, 0)]
        want = _expected(vit_store, corpus, epoch, 2)
        assert len(got) == len(want) == 12
        for g, w in zip(got, want):
            _same(g, w)
    # 24 batches through at most the batches in flight (4 ahead, one being read) plus one
    assert len(set(slots)) <= 6 and set(slots) <= set(range(8))
    assert len(slots) == 24


def test_a_kept_batch_is_never_overwritten_and_the_rest_are_collated_as_before(vit_store, corpus):
    stream = _stream(vit_store, corpus, workers=1)
    loader = training_loader(stream, batch_size=2, workers=1)
    kept = list(loader)  # never released
    want = _expected(vit_store, corpus, 0, 2)
    assert len(kept) == len(want) == 12
    for g, w in zip(kept, want):
        _same(g, w)
    with_slot = [b["slot"].index for b in kept if "slot" in b]
    assert sorted(with_slot) == list(range(8))  # the eight buffers, each once; the other batches own memory
    assert all(set(b) == {"key", *TENSORS} for b in kept if "slot" not in b)


def test_a_shorter_last_batch_gets_a_buffer_of_its_own_shape(vit_store, corpus):
    stream = _stream(vit_store, corpus, workers=1)
    loader = training_loader(stream, batch_size=5, workers=1)
    got = []
    for batch in loader:
        got.append((_copy(batch), batch["slot"].index))
        release_batch(batch)
    want = _expected(vit_store, corpus, 0, 5)
    assert [len(b["key"]) for b, _ in got] == [5, 5, 5, 5, 4]
    for (g, _), w in zip(got, want):
        _same(g, w)
    assert got[-1][1] not in {i for _, i in got[:-1]}  # the 4-sample batch is not stacked into a 5-sample buffer


def _received(flags, index) -> BatchSlot:
    return BatchSlot(flags, index, receiver=os.getpid())  # as the trainer builds it (_received_batch)


def test_release_is_once_per_batch_and_only_where_the_batch_was_received():
    flags = torch.zeros(2, dtype=torch.int32)
    flags[1] = 1
    batch = {"key": ["a"], "slot": _received(flags, 1)}
    release_batch(batch)
    assert flags.tolist() == [0, 0]
    flags[1] = 1  # the worker stacked a later batch into it
    release_batch(batch)  # a second release of the first batch must not free the later one
    assert flags.tolist() == [0, 1]
    release_batch({"key": ["b"]})  # collated without a buffer: nothing to do
    slot = _received(flags, 1)
    slot.release()
    flags[1] = 1
    del slot  # dropped after its release: nothing more
    assert flags.tolist() == [0, 1]
    BatchSlot(flags, 1).release()  # the worker's own copy (never received) releases nothing
    assert flags.tolist() == [0, 1]


def test_a_batch_dropped_unreleased_hands_its_buffer_back(vit_store, corpus):
    stream = _stream(vit_store, corpus, workers=1)
    loader = training_loader(stream, batch_size=2, workers=1)
    for epoch in range(3):  # epochs cut short: the batches in flight are dropped by the DataLoader
        stream.set_epoch(epoch)
        batches = iter(loader)
        assert "slot" in next(batches)
    stream.set_epoch(3)
    got, slots = [], []
    for batch in loader:  # dropped as the loop moves on, never released
        got.append(_copy(batch))
        slots.append(batch["slot"].index if "slot" in batch else None)
    assert None not in slots and len(set(slots)) <= 6  # every batch in a buffer handed back
    want = _expected(vit_store, corpus, 3, 2)
    assert len(got) == len(want) == 12
    for g, w in zip(got, want):
        _same(g, w)


def test_in_the_trainers_own_process_it_is_plain_collate():
    samples = [{"key": f"k{i}", "view": i, "image": torch.full((3, 4, 4), i, dtype=torch.uint8), "label": i,
                "vit/cls": torch.full((8,), float(i), dtype=torch.float16)} for i in range(3)]
    got, want = SharedBatches()(samples), collate(samples)
    assert set(got) == set(want) and "slot" not in got
    for k in ("view", "image", "label", "vit/cls"):
        assert torch.equal(got[k], want[k])


@pytest.mark.parametrize("workers", [2])
def test_each_worker_has_its_own_buffers(vit_store, corpus, workers):
    stream = _stream(vit_store, corpus, workers=workers)
    loader = training_loader(stream, batch_size=2, workers=workers)
    flags, n = [], 0
    for batch in loader:
        flags.append(batch["slot"].flags)  # held: the trainer maps a worker's flags once, while they live
        n += len(batch["key"])
        release_batch(batch)
    assert n == 24 and len({f.data_ptr() for f in flags}) == workers


def test_a_buffers_memory_crosses_once_then_its_batches_cross_as_handles(vit_store, corpus, monkeypatch):
    """torch passes a shared tensor's memory by file descriptor, one connection per field per
    batch; a buffer's descriptors cross with its first batch only, later batches name it."""
    received = []
    real = resource_sharer.DupFd.detach

    def detach(self):  # the trainer takes one descriptor the worker passed
        received.append(1)
        return real(self)
    monkeypatch.setattr(resource_sharer.DupFd, "detach", detach)
    stream = _stream(vit_store, corpus, workers=1)
    loader = training_loader(stream, batch_size=2, workers=1)
    mapped, n = {}, 0
    for epoch in range(3):
        stream.set_epoch(epoch)
        for batch in loader:
            index = batch["slot"].index
            fields = {k: batch[k].data_ptr() for k in TENSORS}
            assert mapped.setdefault(index, fields) == fields  # the trainer reads a buffer where it mapped it
            n += 1
            release_batch(batch)
    buffers = len(mapped)
    assert n == 36 and buffers <= 6
    # each buffer's five fields and the worker's flags, once per buffer (torch's own cache may
    # spare the flags' repeats): not 36 batches x 6
    assert buffers * len(TENSORS) <= len(received) <= buffers * (len(TENSORS) + 1)


def test_a_handle_is_small_and_names_an_unknown_buffer_with_a_clear_error():
    message = pickle.dumps((loader_module._received_batch, (os.getpid() + 10**6, 3, {"key": ["a"]}, None)))
    assert len(message) < 200
    fn, args = pickle.loads(message)
    with pytest.raises(loader_module.TransportError, match="buffer 3"):
        fn(*args)


def test_the_trainer_forgets_the_buffers_of_workers_that_exited(monkeypatch):
    monkeypatch.setattr(loader_module, "_MAPPED", {})
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its pid names no process
    flags = torch.zeros(2, dtype=torch.int32)
    tensors = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}
    batch = loader_module._received_batch(gone.pid, 0, {"key": ["a", "b"]}, (tensors, flags))
    assert batch["image"] is tensors["image"] and batch["key"] == ["a", "b"] and batch["slot"].index == 0
    again = loader_module._received_batch(gone.pid, 0, {"key": ["c", "d"]}, None)  # a later batch: the handle alone
    assert again["image"] is tensors["image"] and again["key"] == ["c", "d"]
    loader_module._received_batch(os.getpid(), 1, {"key": ["e"]}, ({"image": torch.ones(1)}, flags))  # a new worker
    assert set(loader_module._MAPPED) == {(os.getpid(), 1)}


def test_out_of_shared_memory_is_one_line_saying_what_to_do(monkeypatch):
    """A full /dev/shm (torch's own error, as a DataLoader worker meets it) becomes a TransportError
    naming /dev/shm and the options that lower what a worker keeps there; other errors pass."""
    import torch

    from kdcache.data import transport
    real = torch.storage.TypedStorage._new_shared

    def full(self, size, *args, **kwargs):
        raise RuntimeError("unable to write to file </torch_123_456_0>: No space left on device (28)")
    monkeypatch.setattr(torch.storage.TypedStorage, "_new_shared", full)
    with pytest.raises(transport.TransportError, match=r"out of shared memory \(/dev/shm\) for a 4 MB part of a batch.*"
                                                        r"--shm-size.*--workers or --batch-size"):
        transport._shared_empty((256, 4096), torch.float32)
    monkeypatch.setattr(torch.storage.TypedStorage, "_new_shared", lambda self, size, *a, **k: (_ for _ in ()).throw(
        RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        transport._shared_empty((4,), torch.float32)
    monkeypatch.setattr(torch.storage.TypedStorage, "_new_shared", real)
    assert transport._shared_empty((3, 2), torch.float32).shape == (3, 2)
