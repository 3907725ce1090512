"""The loader as a line of stages: one epoch's samples for one rank and DataLoader worker.

Every sample of an epoch passes the same stages, whoever reads (a cached or an online training
run, evaluation, the benchmarks):

    split     (``data.partition``: this stream's positions of the epoch's order)
    -> source (``data.pixels``: the corpus bytes of the rows of a block, one ranged read per block)
    -> rows   (``store.reads``: the block's target rows, one verified read per array and view)
    -> pixels (``data.pixels``: decoded once per image, its view replayed at each crop's size)
    -> order  (the window's samples in the epoch's order: the shuffle is part of the plan)
    -> batch and transport (``data.transport``: shared memory the trainer maps once)

A block's corpus bytes and target rows are read in a thread while the samples before it are
decoded (both release the GIL: file and object reads, Blosc, CRC-32, the finiteness test); the
samples of a window are delivered in the epoch's order once the blocks they come from are in.
Errors follow one policy (``skip_log``): a corrupt block or a changed corpus image stops the
run naming shard and key, or is skipped and recorded with the samples it cost.

The stream knows its position: each sample carries ``stream`` (which (rank, worker) delivered
it) and ``offset`` (its index in that stream's run), so a trainer can record how far every
stream got, and a resumed run starts each stream where it stopped (``data.partition``).
"""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset

from kdcache.errors import KdcacheError, StoreError, one_line
from kdcache.store.meta import ViewPolicy, per_image
from kdcache.store.reads import BlockBuffers

from .corpus import Corpus, DecodeOptions
from .partition import (VIEW_CHOICES, EpochOrder, Ranges, Sample, ShardRows, current_worker, pick_view, split_epoch,
                        samples_per_image)
from .pixels import Crop, ShardPlaces, StoredView, folder_files, read_rows, view_pixels, walked_places
from .views import sub_view, view_at
from .walk import AlignError, RawSample, Skip

VIEW_SOURCES = ("stored", "fresh", "eval")  # the store's boxes (replayed), a fresh view of the policy, the eval view
IMAGE_SOURCES = ("corpus", "pixels")  # the corpus's images (a view cut from each), or the store's own view pixels


class StreamError(KdcacheError):
    pass


@dataclass(frozen=True)
class StreamSpec:
    """What a stream delivers (frozen and picklable: it crosses into DataLoader workers).

    ``crops``: ``(field, Crop)`` pairs; the first is the student's ``image``, others (an online
    run's ``input/<teacher>``) are cut from the same view. ``views``: ``stored`` (the store's
    boxes, a block's view by ``view_choice``), ``fresh`` (view ``epoch + 1`` of ``policy``, or 0
    with ``view_choice`` ``first``: online distillation) or ``eval`` (view 0 of ``policy``).
    ``target_paths``: store arrays whose rows each sample carries (stored bytes)."""

    shards: tuple[ShardRows, ...]
    crops: tuple[tuple[str, Crop], ...]
    decode: DecodeOptions = DecodeOptions()
    views: str = "stored"
    view_choice: str = "epoch"
    stored_views: int = 1
    policy: ViewPolicy | None = None
    seed: int = 0
    window: int = 256
    shuffle: bool = True
    batch_size: int = 1
    last_batch: str = "partial"
    workers: int = 0  # DataLoader workers: part of the split
    store_url: str | None = None
    target_paths: tuple[str, ...] = ()
    verify: bool = True  # check every block read (off only to measure the checks' cost: bench load)
    skip_log: str | None = None  # --skip-corrupt: a corrupt block or changed image is skipped and recorded here
    skip_bad: bool = False  # a corpus read without a store (evaluation): an image that does not decode is skipped, counted
    eval_policies: tuple[ViewPolicy, ...] = ()  # views "eval": each crop from its own model's eval box (one per crop)
    source: str = "corpus"  # corpus: each view cut from its image | pixels: the store's own crop of each view
    color_jitter: float = 0.0
    sub_views: float = 0.0
    dense_views: bool = False

    def __post_init__(self):
        if self.views not in VIEW_SOURCES:
            raise StreamError(f"views {self.views!r}: expected one of {', '.join(VIEW_SOURCES)}")
        if self.view_choice not in VIEW_CHOICES:
            raise StreamError(f"view_choice {self.view_choice!r}: expected one of {', '.join(VIEW_CHOICES)}")
        if self.views != "stored" and self.policy is None:
            raise StreamError(f"views {self.views!r} draws from a view policy; none given")
        if self.eval_policies and (self.views != "eval" or len(self.eval_policies) != len(self.crops)):
            raise StreamError("eval_policies: one per crop, with views 'eval'")
        if self.source not in IMAGE_SOURCES:
            raise StreamError(f"source {self.source!r}: expected one of {', '.join(IMAGE_SOURCES)}")
        if self.source == "pixels" and (self.views == "fresh" or self.dense_views or not self.store_url):
            raise StreamError("the store's pixels hold its stored views: fresh views and dense maps need the corpus")

    @property
    def per_image(self) -> int:
        """Samples per image: every stored view with ``--view-choice all``."""
        return samples_per_image(self.view_choice, self.stored_views) if self.views == "stored" else 1

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.shards, seed=self.seed, epoch=epoch, window=self.window, per_image=self.per_image,
                          shuffle=self.shuffle)


@dataclass
class _Shard:
    """What a stream keeps of a shard while it reads its blocks: its attributes, keys, stored view
    boxes, and the places of its images in the corpus."""

    attrs: dict
    keys: tuple[str, ...]
    views: np.ndarray | None
    places: ShardPlaces | None


@dataclass
class _Block:
    """One block of one shard as this stream needs it: the images of the rows it delivers, the
    view its samples take (None: every view), and per view the target rows of the block."""

    shard: int
    start: int
    view: int | None
    meta: _Shard | None = None
    samples: dict[int, RawSample] = field(default_factory=dict)
    targets: dict[int | None, dict[str, np.ndarray]] = field(default_factory=dict)
    error: str | None = None  # the block was skipped (--skip-corrupt): why


class SampleStream(IterableDataset):
    """Yields sample dicts: key, image (3, H, W) uint8, view, label, stream, offset, the target rows
    (stored bytes) of ``spec.target_paths``, the other crops, and what derived views need.

    ``corpus``: the corpus the images come from. ``places``: the images' places per shard when the
    caller has them (an online run's count pass); else they come from the store (``origin``) or
    from the corpus's own walk. The epoch and a resumed epoch's positions live in shared memory
    or are fixed before the workers fork, so persistent DataLoader workers follow ``set_epoch``."""

    def __init__(self, spec: StreamSpec, corpus: Corpus, *, rank: int = 0, world: int = 1,
                 places: dict[str, ShardPlaces] | None = None, epoch: int = 0):
        self.spec, self.corpus, self.rank, self.world = spec, corpus, rank, world
        self.places = places
        self._epoch = multiprocessing.Value("i", epoch)  # inherited by the workers
        self.resume: tuple[int, Ranges] | None = None  # (epoch, positions left) of a resumed run
        self.skipped: list[dict] = []  # with ``skip_bad``: the images that did not decode (in this process)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._store = None
        self._reader: ThreadPoolExecutor | None = None
        self._buffers = BlockBuffers()
        self._shards: OrderedDict[int, _Shard] = OrderedDict()  # the last few shards read (the reading thread's)

    # -- the epoch ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int, following: int | None = None) -> None:
        """The epoch the next ``iter`` streams (``following``: accepted for callers that name the next)."""
        self._epoch.value = epoch

    def resume_at(self, epoch: int, remaining: Ranges) -> None:
        """Epoch ``epoch`` delivers only these positions (what a checkpoint left); call before the
        first ``iter`` (DataLoader workers fork with it)."""
        self.resume = (epoch, [tuple(r) for r in remaining])

    def remaining(self, epoch: int) -> Ranges | None:
        return self.resume[1] if self.resume is not None and self.resume[0] == epoch else None

    def split(self, epoch: int, order: EpochOrder | None = None):
        """This epoch's split (``data.partition.split_epoch``): the same on every rank and worker."""
        spec = self.spec
        order = order or spec.order(epoch)
        remaining = self.remaining(epoch)
        return split_epoch([(0, order.total)] if remaining is None else remaining, world=self.world,
                           workers=spec.workers, batch_size=spec.batch_size, last_batch=spec.last_batch)

    def with_spec(self, spec: StreamSpec) -> "SampleStream":
        """The same stream reading as ``spec`` says (evaluation: view 0, no shuffle)."""
        return type(self)(spec, self.corpus, rank=self.rank, world=self.world, places=self.places)

    def __iter__(self):
        if self._pid != os.getpid():  # a fork (a DataLoader worker) inherits these objects, not their threads
            self._reset()
        if self._store is None and self.spec.store_url:
            from kdcache.store import Store
            self._store = Store.open(self.spec.store_url)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="kdcache-blocks")
        try:
            yield from self._samples(self.epoch)
        except GeneratorExit:
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None

    # -- the stages --------------------------------------------------------------------------
    def _samples(self, epoch: int):
        spec = self.spec
        worker, workers = current_worker()
        if workers != max(1, spec.workers):
            raise StreamError(f"the stream was planned for {spec.workers} workers, the DataLoader runs {workers}")
        order = spec.order(epoch)
        split = self.split(epoch, order)
        sid = split.stream_id(self.rank, worker)
        mine = list(order.samples(split.run(self.rank, worker)))
        chunks = _windows(mine, spec.window)
        blocks = self._plan_blocks(mine, chunks, epoch)
        pending: dict[tuple[int, int], Future] = {}
        loaded: dict[tuple[int, int], _Block] = {}
        jitter = _color_jitter(spec.color_jitter)
        offset = 0
        for c, (lo, hi) in enumerate(chunks):
            for ahead in (c, c + 1):  # this window's blocks, and the next one's while this one decodes
                if ahead < len(chunks):
                    for key in blocks.first.get(ahead, ()):
                        if key not in pending and key not in loaded:
                            pending[key] = self._reader.submit(self._load_block, key, blocks, epoch)
            for key in blocks.first.get(c, ()):
                if key not in loaded:
                    loaded[key] = pending.pop(key).result()
            chunk = mine[lo:hi]
            pixels = self._pixels(chunk, loaded, blocks, epoch)
            for s in chunk:
                block = loaded[blocks.key(s)]
                item = next(pixels)
                if item is not None:
                    sample = self._sample(s, block, item)
                    if jitter is not None:
                        seed = _sample_seed(spec.seed, epoch, s.position, s.slot)
                        if isinstance(sample["image"], StoredView):  # jittered once its batch decodes it
                            sample["image"] = replace(sample["image"], jitter=jitter, seed=seed)
                        else:
                            torch.manual_seed(seed)
                            sample["image"] = jitter(sample["image"])
                    yield {**sample, "stream": sid, "offset": offset}
                offset += 1
            for key in blocks.last.get(c, ()):
                loaded.pop(key, None)

    def _plan_blocks(self, mine: list[Sample], chunks, epoch: int) -> "_BlockPlan":
        """Which blocks this stream reads, which of their rows it delivers, and in which windows
        each block is first and last needed."""
        plan = _BlockPlan(self.spec.shards)
        for c, (lo, hi) in enumerate(chunks):
            for s in mine[lo:hi]:
                key = plan.key(s)
                if key not in plan.rows:
                    plan.rows[key] = set()
                    plan.first.setdefault(c, []).append(key)
                plan.rows[key].add(s.row)
                plan.last_chunk[key] = c
        for key, c in plan.last_chunk.items():
            plan.last.setdefault(c, []).append(key)
        return plan

    def _shard(self, index: int) -> _Shard:
        """A shard's attributes, keys, view boxes and image places (kept for the last few shards)."""
        got = self._shards.get(index)
        if got is not None:
            self._shards.move_to_end(index)
            return got
        spec, name = self.spec, self.spec.shards[index].name
        corpus_shard = self.corpus.shard(name) if self.corpus is not None else None
        if self._store is None:  # no store: the caller's places (an online run, evaluation)
            places = self.places[name]
            got = _Shard({}, places.keys, None, places)
        else:
            store, planned = self._store, spec.shards[index]
            attrs = store.shard_attrs(name) or {}
            if attrs.get("complete") is not True:
                raise StoreError(f"{store.url}: shard {name} is not complete, though the run planned it complete "
                                 f"(rewritten since the run started, or a stale shard index: `kdcache store stats` "
                                 f"rewrites it)")
            if attrs.get("count") != planned.count:
                raise StoreError(f"{store.url}: shard {name} holds {attrs.get('count')} samples, the run planned "
                                 f"{planned.count} (rewritten since the run started, or a stale shard index: "
                                 f"`kdcache store stats` rewrites it)")
            if planned.digest is not None and digests_hash(attrs.get("digest", {})) != planned.digest:
                raise StoreError(f"{store.url}: shard {name}: its digests are not those the run was planned with "
                                 f"(RUN/plan.json): the store changed since the run was checkpointed")
            keys = tuple(store.keys(name).tolist())
            views = store.views(name) if spec.views == "stored" or spec.source == "pixels" else None
            origin = store.origin(name)
            files = folder_files(corpus_shard, keys) if corpus_shard is not None and self.corpus.kind == "folder" else ()
            places = ShardPlaces.from_origin(name, keys, origin, files=files) if origin is not None else None
            if corpus_shard is not None and (places is None or spec.source == "pixels"):
                # a store from before origin reads its images by the walk; a pixel store given its corpus checks
                # that the corpus holds the stored keys (AlignError naming shard, row and key otherwise)
                walked = walked_places(self.corpus, corpus_shard, keys, attrs.get("failed", []))
                places = places or walked
            got = _Shard(attrs, keys, views, places)
        self._shards[index] = got
        while len(self._shards) > 32:
            self._shards.popitem(last=False)
        return got

    def _load_block(self, key: tuple[int, int], plan: "_BlockPlan", epoch: int) -> _Block:
        """In the reading thread: the block's images (the rows this stream delivers) and target rows
        (of the view the block takes this epoch), checked; a failure is raised, or with
        ``skip_log`` recorded and the block delivered empty."""
        spec = self.spec
        index, b = key
        rows_info = spec.shards[index]
        start, stop = b * rows_info.block, min(rows_info.count, (b + 1) * rows_info.block)
        name = rows_info.name
        view = self._block_view(index, b, epoch)
        block = _Block(index, start, view)
        try:
            block.meta = shard = self._shard(index)
            handler = self._skip_handler(epoch, name)
            if spec.source == "pixels":  # the store's own crop of each view: one verified read per block and view
                views = [view] if view is not None else list(range(spec.stored_views))
                for v in views:
                    got = self._store.read_pixels(name, start, stop, view=v, attrs=shard.attrs, verify=spec.verify)
                    for r in plan.rows[key]:
                        label = int(shard.places.labels[r]) if shard.places is not None else -1
                        block.samples[(r, v)] = RawSample(shard.keys[r], got[r - start], None if label < 0 else label,
                                                          row=r)
            elif self.corpus is not None:
                block.samples = read_rows(self.corpus, self.corpus.shard(name), shard.places, sorted(plan.rows[key]),
                                          handler=handler, verify=spec.verify)
            if self._store is not None and spec.target_paths:
                views = [view] if view is not None else list(range(spec.stored_views))
                for v in views:
                    block.targets[v] = {
                        p: self._store.read_span(name, p, start, stop, attrs=shard.attrs, verify=spec.verify,
                                                 view=None if per_image(p) else v, buffers=self._buffers)
                        for p in spec.target_paths}
        except (StoreError, AlignError) as e:
            if not spec.skip_log:
                raise
            block.error, block.samples, block.targets = one_line(e), {}, {}
            record_skip(spec.skip_log, {"epoch": epoch, "shard": name, "block": b, "error": block.error,
                                        "samples_skipped": len(plan.rows[key]) * spec.per_image})
        return block

    def _block_view(self, index: int, b: int, epoch: int) -> int | None:
        """The stored view block ``b`` of a shard takes this epoch (``pick_view``); None: every view
        (``--view-choice all``); 0 for views not replayed from the store (dense maps are per image)."""
        spec = self.spec
        if spec.views != "stored" or spec.dense_views:
            return 0
        if spec.view_choice == "all":
            return None
        return pick_view(spec.view_choice, spec.stored_views, shard=spec.shards[index].name, block=b, epoch=epoch,
                         seed=spec.seed)

    def _skip_handler(self, epoch: int, shard: str) -> Callable[[Skip], None]:
        """A stored image that cannot be read, changed, or no longer decodes: the corpus changed under
        the store. One line naming shard and key, or with ``skip_log`` recorded and left out."""
        spec = self.spec

        def handle(skip: Skip) -> None:
            error = f"shard {shard}: sample {skip.key!r}: {skip.error}"
            if spec.skip_bad:  # (no store: nothing says it decoded before)
                self.skipped.append({"shard": shard, "key": skip.key, "error": skip.error})
                return
            if not spec.skip_log:
                raise AlignError(error if "changed" in skip.error else f"{error} (it was extracted; the corpus changed "
                                                                       f"under the store)")
            record_skip(spec.skip_log, {"epoch": epoch, "shard": shard, "key": skip.key, "error": error,
                                        "samples_skipped": spec.per_image})
        return handle

    def _pixels(self, chunk: list[Sample], loaded: dict, plan: "_BlockPlan", epoch: int):
        """Per sample of a window, in order: (the crops, one per crop field; the view delivered; extra
        fields), or None when its image was skipped. Each image is decoded once, when its first sample
        comes, and every view of it this window delivers is cut from that decode (``--view-choice all``);
        the other views wait until their turn, nothing else is held."""
        spec = self.spec
        slots: dict[tuple[int, int], list[int]] = {}
        for s in chunk:
            slots.setdefault((s.shard, s.row), []).append(s.slot)
        waiting: dict[tuple[int, int, int], tuple] = {}
        crops = [c for _, c in spec.crops]
        for s in chunk:
            index, row = s.shard, s.row
            if (index, row, s.slot) in waiting:
                yield waiting.pop((index, row, s.slot))
                continue
            block = loaded[plan.key(s)]
            if spec.source == "pixels":  # each view its own stored crop: decoded alone (at the scale it needs)
                yield self._stored_view(s, block, crops, epoch)
                continue
            raw = block.samples.get(row)
            if raw is None:  # skipped (recorded), or its block was
                yield None
                continue
            wanted = slots.pop((index, row))
            own = bool(spec.eval_policies)  # each crop from its own eval box (a student and a teacher of other crops)
            picked = ([(0, lambda h, w, p=p, key=raw.key: view_at(p, key, 0, h, w)) for p in spec.eval_policies] if own
                      else [self._view(raw.key, block, row, slot, epoch) for slot in wanted])

            def boxes(sample, height: int, width: int, picked=picked) -> np.ndarray:  # drawn from the full size
                return np.stack([box(height, width) for _, box in picked])

            got = None
            for item in view_pixels([raw], views=boxes, crops=crops, decode=spec.decode,
                                    handler=self._skip_handler(epoch, spec.shards[index].name)):
                for i, slot in enumerate(wanted):
                    view = picked[i][0]
                    cut = [c[j] for j, c in enumerate(item.crops)] if own else [c[i] for c in item.crops]
                    waiting[(index, row, slot)] = (cut, view, self._extra(raw.key, block, row, view, item.views[i], epoch))
                got = waiting.pop((index, row, s.slot))
            yield got

    def _stored_view(self, s: Sample, block: _Block, crops, epoch: int):
        """One sample from the view's pixels the store keeps, left for its batch to decode
        (``data.pixels.StoredView``): the whole crop, or its sub-box (``--sub-views``: where its
        targets are cut from the stored grid, in the crop as stored), at each crop field's size;
        None when its block was skipped (its bytes were checked with the block: the JPEGs a store
        writes, or (h, w, 3) uint8 rows of the shape the store declares)."""
        spec = self.spec
        view = s.slot if block.view is None else block.view
        raw = block.samples.get((s.row, view))
        if raw is None:
            return None
        box, extra = None, {}
        if spec.sub_views:
            _, sub_box = sub_view(block.meta.views[s.row, view], spec.seed, raw.key, epoch, spec.sub_views)
            box, extra = np.array([*sub_box, 0.0], dtype=np.float32), {"sub_box": torch.from_numpy(sub_box)}
        return [StoredView(raw.key, raw.data, c, spec.decode, box) for c in crops], view, extra

    def _view(self, key: str, block: _Block, row: int, slot: int, epoch: int):
        """(the view a sample delivers, (height, width) -> its box in image fractions)."""
        spec = self.spec
        if spec.views == "eval":
            return 0, lambda h, w: view_at(spec.policy, key, 0, h, w)
        if spec.views == "fresh" or spec.dense_views:  # a fresh view (online; dense maps cut where it lies)
            index = 0 if spec.view_choice == "first" and not spec.dense_views else epoch + 1
            return index, lambda h, w: view_at(spec.policy, key, index, h, w)
        view = slot if block.view is None else block.view
        box = block.meta.views[row, view]
        if spec.sub_views:  # the student's box inside the stored one (the sub-box's targets: ``_extra``)
            student, _ = sub_view(box, spec.seed, key, epoch, spec.sub_views)
            return view, lambda h, w: student
        return view, lambda h, w: box

    def _extra(self, key: str, block: _Block, row: int, view: int, box: np.ndarray, epoch: int) -> dict:
        """What derived views add to a sample: where its targets are cut from (``targets.derive``)."""
        spec = self.spec
        if spec.dense_views:  # the view's box and flip on the image's dense map
            return {"dense_box": torch.from_numpy(box[:4].copy()), "dense_flip": torch.tensor(float(box[4] >= 0.5))}
        if spec.sub_views and spec.views == "stored":  # the sub-box on the stored view's grid
            _, sub_box = sub_view(block.meta.views[row, view], spec.seed, key, epoch, spec.sub_views)
            return {"sub_box": torch.from_numpy(sub_box)}
        return {}

    def _sample(self, s: Sample, block: _Block, item) -> dict:
        spec = self.spec
        crops, view, extra = item
        meta = block.meta
        label = int(meta.places.labels[s.row]) if meta.places is not None else -1
        out = {"key": meta.keys[s.row], "image": crops[0], "view": view, "label": label, **extra}
        for (name, _), crop in zip(spec.crops[1:], crops[1:]):
            out[name] = crop
        if spec.target_paths:
            rows = block.targets[s.slot if block.view is None else block.view]
            r = s.row - block.start
            for p, b in rows.items():
                a = b[r]
                out[p] = torch.from_numpy(np.ascontiguousarray(a) if a.ndim else np.array(a))  # (a log-sum-exp is 0-d)
        return out


class _BlockPlan:
    """A stream's blocks for one epoch: the rows of each it delivers, where each is first and last needed."""

    def __init__(self, shards):
        self.shards = shards
        self.rows: dict[tuple[int, int], set[int]] = {}
        self.first: dict[int, list[tuple[int, int]]] = {}
        self.last: dict[int, list[tuple[int, int]]] = {}
        self.last_chunk: dict[tuple[int, int], int] = {}

    def key(self, s: Sample) -> tuple[int, int]:
        return s.shard, s.row // max(1, self.shards[s.shard].block)


def digests_hash(digest: dict) -> str:
    """A short hash of a shard's digest record: what a run's plan keeps of each shard."""
    import hashlib
    return hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()[:16]


def shard_rows(store, names) -> tuple[ShardRows, ...]:
    """The plan's view of a store's complete shards: name, images, rows per block (from the shard
    index where it has them: no request per shard)."""
    return tuple(ShardRows(n, int(store.shard_summary(n)["count"]), store.shard_block(n)) for n in names)


def _windows(mine: list[Sample], window: int) -> list[tuple[int, int]]:
    """[lo, hi) slices of a stream's samples, each within one window of the epoch's order."""
    out, lo = [], 0
    for i in range(1, len(mine) + 1):
        if i == len(mine) or mine[i].position // window != mine[i - 1].position // window or i - lo >= window:
            out.append((lo, i))
            lo = i
    return out


def _sample_seed(seed: int, epoch: int, position: int, slot: int) -> int:
    """The student-only augmentation's seed of one sample: the same whoever delivers it."""
    import hashlib
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{position}/{slot}".encode()).digest()[:8], "little") >> 1


def _color_jitter(strength: float):
    if not strength:
        return None
    from torchvision.transforms import v2
    return v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength)


def record_skip(path: str, record: dict) -> None:
    """One JSON line per skipped block or sample; O_APPEND keeps lines whole across worker processes."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_skips(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
