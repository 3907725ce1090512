"""Corpus bytes -> the pixels of a view: the bytes read where they lie, decoding, the K views,
crops; as two stages of the stream (source, pixels).

**Reading** (``ShardPlaces``, ``read_rows``): any stored sample of a corpus shard, by row. A
loader that splits an epoch by sample (``data.partition``) reads the rows of a block of any
shard, not whole shards from their start. ``ShardPlaces`` says, for every stored row of a shard,
its key, its label and where its image bytes lie: a byte range of the tar (the image member's
data), or a file of an image folder. ``read_rows`` then reads any rows with one ranged read per
run of nearby rows (the rows of one block sit together in a tar: one request per block on object
storage), and checks each image against the CRC-32 extraction recorded. The places come from the
store's ``origin`` rows (store format 3: offset, length, CRC-32, label per sample) with its keys:
no corpus read at all before the images themselves; for a store written before, from the corpus
shard's own walk aligned with the stored keys (``data.walk.align``: a local tar's headers only, a
remote tar once, kept per process); with no store (online distillation, evaluation), from the
walk of the samples that decode. A compressed tar (its offsets are not the file's) is read by
walking it to the rows asked for.

**Decoding** turns a sample's bytes into an RGB uint8 image, converting where meaningful
(grayscale, palette, CMYK, RGBA, 16-bit) and rejecting otherwise (empty, not an image,
truncated, decompression bomb, smaller than ``min_size``) with a ``BadImage`` whose message is
the reason recorded.

**Views** (which box of an image view i is: ``data.views``) are replayed at any resolution by
``replay_view``.

**The stage** ``view_pixels`` is the one place a sample is decoded and cut: extraction (views
drawn, or a complete shard's stored ones), the cached loader (the view of this epoch), the
online loader (a fresh view), model-feature evaluation (the eval view) and the benchmarks all
chain it after the walk (``data.walk``). A sample that does not decode goes to the ``handler``
the caller passes (webdataset's ``handler=`` idea; ``data.walk`` has them): it records the
skip and the stage moves on, or it raises. No other module catches ``BadImage``.

**A store's own view pixels** (``extract --pixels``) are the crops already cut: the stream
delivers each as a ``StoredView`` (its JPEG bytes), and the batch decodes them
(``decode_views``, called by ``data.transport.collate``): at the student's size, libjpeg-turbo
writes each straight into the batch's memory; any other size or a sub-box goes through the same
decode and ``replay_view`` as a corpus image. FFCV's idea (the pixels stored at the training
resolution, decoded into the batch), on the store's own blocks.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from kdcache.errors import KdcacheError
from kdcache.store.meta import INTERPOLATIONS

from kdcache.store.checks import bytes_crc32
from kdcache.store.remote import is_url

from .corpus import Corpus, CorpusShard, DecodeOptions
from .views import WHOLE_IMAGE, view_box
from .walk import AlignError, RawSample, Skip, align


class BadImage(Exception):
    """The sample's bytes are not a usable image; ``str(e)`` is the reason recorded."""


# -- decoding ------------------------------------------------------------------------------

Need = Callable[[int, int], tuple[int, int]]  # full (height, width) -> the (height, width) the decode must reach


def decode_sample(sample: RawSample, opts: DecodeOptions = DecodeOptions(), need: Need | None = None) -> np.ndarray:
    """A corpus sample -> (H, W, 3) uint8, or BadImage (unreadable, no image field, bad bytes)."""
    if sample.error:
        raise BadImage(sample.error)
    if sample.data is None:
        raise BadImage(f"no image field (fields: {', '.join(sample.fields) or 'none'})")
    if isinstance(sample.data, np.ndarray):  # pixels a store keeps raw (extract --pixels SIZE:raw): decoded already
        if need is not None:
            need(*sample.data.shape[:2])  # (the caller draws its views from the size)
        return sample.data
    return decode_image(sample.data, opts, need)


def decode_image(data: bytes | None, opts: DecodeOptions = DecodeOptions(), need: Need | None = None) -> np.ndarray:
    """Decode to an (h, w, 3) uint8 array, or raise BadImage with the reason. ``need`` is called
    once with the image's full (H, W) once its header is read (whatever the format); with
    ``opts.reduced``, a JPEG is then decoded at the smallest scale libjpeg offers (1/2, 1/4, 1/8)
    that keeps at least ``need(H, W)`` pixels: (h, w) = ceil((H, W) / scale). Every check (bomb,
    size) is on the full size, and libjpeg reads every coefficient at any scale, so a sample
    decodes or fails the same either way.

    JPEGs in YCbCr, RGB or grey go to libjpeg-turbo through simplejpeg (the same library Pillow
    wheels bundle, with less around it: about 1.3x PIL at full size, and its scaled decodes are
    faster than PIL's ``draft``); its pixels equal PIL's at every scale (tested). Anything else
    (PNG, CMYK JPEGs, and any JPEG simplejpeg refuses, which PIL then accepts or rejects with
    its reason) goes to PIL."""
    if not data:
        raise BadImage("empty file")
    need = _once(need)
    header = _turbo_header(data)
    if header is not None:
        h, w = header
        _check_size(h, w, opts)
        rgb = _turbo_decode(data, h, w, _scale(h, w, need, opts.reduced))
        if rgb is not None:
            return rgb
    with _image_errors():
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        _check_size(h, w, opts)
    if need is not None:  # outside the image's error handling: the caller's own errors stay theirs
        s = _scale(h, w, need, opts.reduced and img.format == "JPEG")
        if s > 1:
            img.draft(None, (math.ceil(w / s), math.ceil(h / s)))  # PIL keeps the largest scale with >= this size
    with _image_errors():
        img.load()
    return _to_rgb(img)


JPEG_SCALES = (8, 4, 2)  # libjpeg's power-of-two DCT scalings (1/8, 1/4, 1/2): its other M/8 ones decode slower than 1/1


def _scale(h: int, w: int, need: Need | None, reduced: bool) -> int:
    """The largest of 8, 4, 2 that keeps ceil((h, w) / scale) >= need(h, w); 1 when none does or
    the decode is full-size."""
    if need is None:
        return 1
    nh, nw = need(h, w)
    if not reduced:
        return 1
    return next((s for s in JPEG_SCALES if math.ceil(h / s) >= nh and math.ceil(w / s) >= nw), 1)


def _once(need: Need | None) -> Need | None:
    """``need`` called at most once (it draws the views), its answer kept for a second decoder."""
    if need is None:
        return None
    kept = []

    def once(h: int, w: int):
        if not kept:
            kept.append(need(h, w))
        return kept[0]
    return once


def _check_size(h: int, w: int, opts: DecodeOptions) -> None:
    if w * h > opts.max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {opts.max_pixels}")
    if min(w, h) < opts.min_size:
        raise BadImage(f"image too small: {w}x{h} (minimum side {opts.min_size} px)")


TURBO_COLORSPACES = ("YCbCr", "RGB", "Gray")  # what libjpeg-turbo converts to RGB exactly as PIL does (CMYK/YCCK: PIL)


def _turbo_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that simplejpeg will decode, else None (not a JPEG, another
    colour space, a header it cannot read: PIL decides)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (h, w) if colorspace in TURBO_COLORSPACES and h > 0 and w > 0 else None


def _turbo_decode(data: bytes, h: int, w: int, scale: int) -> np.ndarray | None:
    """The JPEG at 1/scale, or None when libjpeg-turbo (strict: its warnings are errors) refuses
    it: then PIL, which tolerates what it always tolerated, accepts it or says why not."""
    oh, ow = math.ceil(h / scale), math.ceil(w / scale)
    try:
        rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=oh, min_width=ow)
    except ValueError:
        return None
    return rgb if rgb.shape == (oh, ow, 3) else None


@contextlib.contextmanager
def _image_errors():
    """What PIL raises for bytes that are not a usable image, as BadImage with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (or wider) single channel: PIL's convert("RGB") would clip, so rescale.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode != "RGB":
        # Alpha is dropped, as torchvision's and timm's loaders do; CMYK, L, P convert.
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable: torch.from_numpy wants to own it


# -- replaying a view --------------------------------------------------------------------

def interpolation_mode(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise KdcacheError(f"interpolation {name!r} is not one of {', '.join(INTERPOLATIONS)}")
    return InterpolationMode(name)


def replay_view(image: torch.Tensor, view: np.ndarray, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Crop, resize (antialiased) and flip a (3, H, W) uint8 image as the stored view says:
    torchvision's ``resized_crop``. A bilinear or bicubic box inside the image goes straight to
    torch's ``interpolate`` on the uint8 crop, which is what ``resized_crop`` runs for it (the same
    pixels, tested) without its checks and dispatch: 0.046 against 0.068 ms per 64-px view, on
    every sample of every epoch. A box over the edge (rounding) is padded by torchvision."""
    height, width = image.shape[-2], image.shape[-1]
    top, left, h, w, flip = view_box(view, height, width)
    if (top, left, h, w) == (0, 0, height, width) and tuple(size) == (height, width):
        out = image  # a stored view's own crop at its own size: resampling at scale 1 returns the same pixels (tested)
    elif interpolation in ("bilinear", "bicubic") and image.ndim == 3 and top + h <= height and left + w <= width:
        crop = image[None, :, top:top + h, left:left + w]
        out = torch.nn.functional.interpolate(crop, size=list(size), mode=interpolation, antialias=True, align_corners=False)[0]
    else:
        out = TF.resized_crop(image, top, left, h, w, list(size), interpolation=interpolation_mode(interpolation),
                              antialias=True)
    return TF.horizontal_flip(out) if flip else out


# -- the stage -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Crop:
    """One output of the stage: every view of a sample resized to ``size`` (h, w) this way."""

    size: tuple[int, int]
    interpolation: str


@dataclass
class ViewPixels:
    """A sample, its views (k, 5) and per ``Crop`` the crops of those views, (k, 3, h, w) uint8;
    per ``whole`` crop the whole image at that size, (3, h, w) uint8 (dense maps)."""

    sample: RawSample
    views: np.ndarray
    crops: list[torch.Tensor]
    whole: list[torch.Tensor] = field(default_factory=list)


ViewsOf = Callable[[RawSample, int, int], np.ndarray]  # (sample, height, width) -> (k, 5) views


def crop_need(views: np.ndarray, crops: Sequence[Crop]) -> Need:
    """The decoded size that gives every view's box at least every crop's output size: a box of
    fraction f of a side needs ceil(out / f) pixels on that side."""
    fh, fw = max(float(views[:, 2].min()), 1e-6), max(float(views[:, 3].min()), 1e-6)
    oh, ow = max(c.size[0] for c in crops), max(c.size[1] for c in crops)
    return lambda h, w: (math.ceil(oh / fh), math.ceil(ow / fw))


def view_pixels(samples: Iterable[RawSample], *, views: ViewsOf, crops: Sequence[Crop], decode: DecodeOptions,
                handler: Callable[[Skip], None], whole: Sequence[Crop] = ()) -> Iterator[ViewPixels]:
    """Decode each sample, ask ``views`` which views of it to cut (drawn from the policy, the
    stored ones, the one of this epoch), and cut each at every ``Crop``. A sample that does not
    decode goes to ``handler`` (which records it, or raises). Views are drawn from the image's
    full size; the decode is then as small as the views and crops allow (``DecodeOptions.reduced``).
    ``whole``: also the whole image at each of these sizes (the dense maps of ``extract``)."""
    for c in (*crops, *whole):
        interpolation_mode(c.interpolation)
    for s, chosen, rgb in decoded(samples, views=views, crops=crops, decode=decode, handler=handler, whole=whole):
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        yield ViewPixels(s, chosen, [torch.stack([replay_view(image, v, c.size, c.interpolation) for v in chosen])
                                     for c in crops],
                         [replay_view(image, WHOLE_IMAGE[0], c.size, c.interpolation) for c in whole])


def decoded(samples: Iterable[RawSample], *, views: ViewsOf, crops: Sequence[Crop], decode: DecodeOptions,
            handler: Callable[[Skip], None], whole: Sequence[Crop] = ()) -> Iterator[tuple[RawSample, np.ndarray, np.ndarray]]:
    """The stage's decode, nothing cut: (sample, its views (k, 5), the (h, w, 3) uint8 image decoded
    as small as those views and ``crops`` allow). What ``view_pixels`` cuts from; ``kdcache bench
    load`` also times it alone."""
    for s in samples:
        chosen = []

        def need(h: int, w: int):  # the views are drawn from the full size, before the pixels are decoded
            chosen.append(np.asarray(views(s, h, w), dtype=np.float32).reshape(-1, 5))
            nh, nw = crop_need(chosen[0], crops)(h, w)
            wh, ww = crop_need(WHOLE_IMAGE, whole)(h, w) if whole else (0, 0)
            return max(nh, wh), max(nw, ww)

        try:
            rgb = decode_sample(s, decode, need)
        except BadImage as e:
            handler(Skip(s.key, str(e)))
            continue
        yield s, chosen[0], rgb


def decodable(samples: Iterable[RawSample], *, decode: DecodeOptions, handler: Callable[[Skip], None]) -> Iterator[RawSample]:
    """The samples that decode (nothing is cut); the others go to ``handler``. What an online
    run counts before training: the samples an epoch will deliver."""
    for s in samples:
        try:
            decode_sample(s, decode, lambda h, w: (1, 1))  # at the smallest scale: only whether it decodes matters
        except BadImage as e:
            handler(Skip(s.key, str(e)))
            continue
        yield s


# -- a store's own view pixels, decoded into their batch -------------------------------------------

@dataclass
class StoredView:
    """A sample's stored view pixels (``extract --pixels``) as the stream delivers them: not decoded
    yet. The batch decodes them (``decode_views``), a batch at a time, into its own memory: a
    stored view at the student's size (the usual case) is decoded by libjpeg-turbo straight into
    the batch, with nothing else done per sample. ``pixels``: the JPEG bytes, or the (h, w, 3)
    uint8 crop a raw store keeps; ``box``: the sub-box to cut and resize (``--sub-views``), None
    for the whole crop; ``jitter``: the colour jitter and the seed it is drawn with (the same
    whoever delivers the sample)."""

    key: str
    pixels: bytes | np.ndarray
    crop: Crop
    decode: DecodeOptions
    box: np.ndarray | None = None
    jitter: Callable[[torch.Tensor], torch.Tensor] | None = None
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, *self.crop.size)


class StoredViewError(KdcacheError):
    """Stored view pixels that pass their checksum but do not decode (a hostile or mis-written store)."""


def decode_views(views: Sequence[StoredView], out: torch.Tensor | None = None) -> torch.Tensor:
    """The views' pixels as one (n, 3, h, w) uint8 batch, channels-last in memory (in ``out`` when
    given; ``batch_buffer`` makes one), as FFCV delivers images: each view is decoded straight
    into its place, and nothing moves the channels (a channels-first batch took a strided copy of
    every pixel: 3.4 µs per 64-px view, 39 per 224-px one, measured). A JPEG of the crop's own size
    and no sub-box is decoded there by libjpeg-turbo; any other view goes through the stage's decode
    (the smallest JPEG scale that keeps the crop's size) and ``replay_view``, the same pixels a
    corpus view would get from the same bytes. Stored bytes that pass their checksum and still do
    not decode are a ``StoredViewError`` naming the sample. An ``out`` that is not channels-last
    is filled through a copy."""
    n = len(views)
    h, w = views[0].crop.size
    out = batch_buffer(n, h, w) if out is None else out
    hwc = out.permute(0, 2, 3, 1)  # (n, h, w, 3): where each view's pixels go
    target = hwc.numpy() if hwc.is_contiguous() else np.empty((n, h, w, 3), dtype=np.uint8)
    for i, v in enumerate(views):
        if v.crop.size != (h, w):
            raise StoredViewError(f"a batch of {h}x{w} views holds one of {v.crop.size[0]}x{v.crop.size[1]} ({v.key!r})")
        if v.box is None and _into(v.pixels, target[i]):
            continue
        box = WHOLE_IMAGE[0] if v.box is None else v.box
        try:
            image = decode_sample(RawSample(v.key, v.pixels, None), v.decode, crop_need(box[None], [v.crop]))
        except BadImage as e:
            raise StoredViewError(f"sample {v.key!r}: its stored view pixels do not decode ({e})") from None
        target[i] = replay_view(torch.from_numpy(image).permute(2, 0, 1), box, v.crop.size,
                                v.crop.interpolation).permute(1, 2, 0).numpy()
    if not hwc.is_contiguous():
        hwc.copy_(torch.from_numpy(target))
    for i, v in enumerate(views):
        if v.jitter is not None:
            torch.manual_seed(v.seed)
            out[i] = v.jitter(out[i])
    return out


def batch_buffer(n: int, h: int, w: int, empty: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """An (n, 3, h, w) uint8 batch of stored views, channels-last in memory (``decode_views``);
    ``empty``: how to allocate its (n, h, w, 3) memory (shared memory in a DataLoader worker)."""
    memory = empty((n, h, w, 3)) if empty is not None else torch.empty((n, h, w, 3), dtype=torch.uint8)
    return memory.permute(0, 3, 1, 2)


def _into(pixels: bytes | np.ndarray, target: np.ndarray) -> bool:
    """Stored pixels of exactly ``target``'s (h, w) put there (a JPEG decoded into it by
    libjpeg-turbo, strictly; the decode itself says whether it fits, no header is read first);
    False when they are of another size, or a JPEG libjpeg-turbo refuses (the stage's decode,
    with its checks and PIL behind it, then decides)."""
    h, w = target.shape[:2]
    if isinstance(pixels, np.ndarray):
        if pixels.shape[:2] != (h, w):
            return False
        target[...] = pixels
        return True
    if pixels[:3] != b"\xff\xd8\xff":
        return False
    try:  # a larger JPEG does not fit the buffer (ValueError); a smaller one decodes into its start
        got = simplejpeg.decode_jpeg(pixels, "RGB", buffer=target)
    except ValueError:
        return False
    return got.shape == (h, w, 3)


# -- reading: a corpus shard's samples by row, where they lie ------------------------------------

GAP = 1 << 20  # rows whose bytes are at most this far apart are read in one request (tar headers, label members)


class CorpusChanged(AlignError):
    """A sample's image bytes are not those extracted (the corpus changed under the store)."""


@dataclass(frozen=True)
class ShardPlaces:
    """Every stored row of one corpus shard: key, label (-1: none), and where its image bytes are
    (``offsets``/``sizes`` in the tar, -1 when unknown; an image folder's ``files``), with the
    CRC-32 of those bytes when the store recorded it (-1: not recorded)."""

    shard: str
    keys: tuple[str, ...]
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    crcs: np.ndarray
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows) -> "ShardPlaces":
        """These rows only (in this order): e.g. the labelled samples an evaluation scores."""
        rows = np.asarray(list(rows), dtype=np.int64)
        return ShardPlaces(self.shard, tuple(self.keys[r] for r in rows), self.labels[rows], self.offsets[rows],
                           self.sizes[rows], self.crcs[rows], tuple(self.files[r] for r in rows) if self.files else ())

    @classmethod
    def from_samples(cls, shard: str, samples: Iterable[RawSample], *, files: tuple[str, ...] = (),
                     crc: bool = True) -> "ShardPlaces":
        """From samples read in row order; ``crc``: the CRC-32 of the bytes they were read with, so
        a later read of different bytes is caught (none for samples read without their bytes)."""
        rows = list(samples)
        return cls(shard, tuple(s.key for s in rows), np.array([-1 if s.label is None else s.label for s in rows], np.int64),
                   np.array([s.offset for s in rows], np.int64), np.array([s.size for s in rows], np.int64),
                   np.array([bytes_crc32(s.data) if crc and s.data is not None else -1 for s in rows], np.int64), files)

    @classmethod
    def from_origin(cls, shard: str, keys, origin: np.ndarray, *, files: tuple[str, ...] = ()) -> "ShardPlaces":
        return cls(shard, tuple(keys), origin[:, 3].copy(), origin[:, 0].copy(), origin[:, 1].copy(), origin[:, 2].copy(),
                   files)


def folder_files(shard: CorpusShard, keys) -> tuple[str, ...]:
    """An image folder's file per key (the first file of that stem: the walk's rule for duplicates)."""
    first: dict[str, str] = {}
    for rel in shard.members:
        first.setdefault(os.path.splitext(rel)[0], rel)
    return tuple(first.get(k, "") for k in keys)


def walked_places(corpus: Corpus, shard: CorpusShard, keys, failed) -> ShardPlaces:
    """The places of a store shard's rows from the corpus's own walk (a store without ``origin``):
    aligned with the stored keys (``AlignError`` on any difference); a local tar's headers only."""
    from .walk import folder_label, shard_samples
    if corpus.kind == "folder":  # a key names its file: nothing to read
        files = folder_files(shard, keys)
        labels = [folder_label(corpus, f) if f else None for f in files]
        return folder_places(shard.name, keys, labels, files)
    if not is_url(shard.url):  # a local tar's headers only, seeking over the images
        samples = _align_keys(shard, _stored(shard_samples(corpus, shard, read_data=False), failed), list(keys))
    else:
        samples = align(corpus, shard, list(keys), failed)
    return ShardPlaces.from_samples(shard.name, samples, crc=False)


def folder_places(shard: str, keys, labels, files) -> ShardPlaces:
    """An image folder's places: one file per row, no offsets (a row is its whole file)."""
    n = len(files)
    return ShardPlaces(shard, tuple(keys), np.array([-1 if x is None else x for x in labels], np.int64),
                       np.zeros(n, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64), tuple(files))


def _stored(samples, failed):
    from .walk import decode_failures, screen
    skip = decode_failures(failed)
    for s in screen(samples):
        if not isinstance(s, Skip) and s.key not in skip:
            yield s


def _align_keys(shard: CorpusShard, samples, keys: list[str]) -> Iterator[RawSample]:
    row = 0
    for s in samples:
        if row >= len(keys) or s.key != keys[row]:
            want = keys[row] if row < len(keys) else "(end of store shard)"
            raise AlignError(f"shard {shard.name}: corpus key {s.key!r} where the store has {want!r} at row {row}: "
                             f"the store was not extracted from this corpus")
        yield RawSample(s.key, None, s.label, s.fields, s.error, row, s.offset, s.size)
        row += 1
    if row != len(keys):
        raise AlignError(f"shard {shard.name}: the corpus ended after {row} samples, the store has {len(keys)}")


def corpus_places(corpus: Corpus) -> dict[str, ShardPlaces]:
    """Every corpus shard's screened samples and their places, from its walk (a local tar's headers
    only): what a reader of the corpus alone needs to read any of them (no decode is tried)."""
    from .walk import shard_samples, screen
    out = {}
    for shard in corpus.shards:
        if corpus.kind == "folder":
            good = [s for s in screen(shard_samples(corpus, shard, read_data=False)) if not isinstance(s, Skip)]
            out[shard.name] = folder_places(shard.name, [s.key for s in good], [s.label for s in good],
                                            folder_files(shard, [s.key for s in good]))
        else:
            good = (s for s in screen(shard_samples(corpus, shard, read_data=is_url(shard.url))) if not isinstance(s, Skip))
            out[shard.name] = ShardPlaces.from_samples(shard.name, good, crc=False)
    return out


def read_rows(corpus: Corpus, shard: CorpusShard, places: ShardPlaces, rows: Iterable[int], *,
              handler: Callable[[Skip], None], verify: bool = True) -> dict[int, RawSample]:
    """{row: the sample with its image bytes} for ``rows`` of a shard. A sample whose bytes are not
    those recorded (CRC-32), or that cannot be read, goes to ``handler`` (it raises, or records and
    the row is left out). Runs of rows whose bytes lie together are one read. ``verify`` off (only
    ``bench load``, to measure what the checks cost): the CRC-32 is not compared."""
    rows = sorted(set(int(r) for r in rows))
    out: dict[int, RawSample] = {}
    if not rows:
        return out
    if corpus.kind == "folder":
        for r in rows:
            data = _read_file(os.path.join(shard.url, places.files[r]), places, r, handler) if places.files[r] else None
            if data is not None:
                out[r] = _sample(places, r, data, handler, verify)
    elif (places.offsets[rows] < 0).any():  # a compressed tar: walk it to the rows
        wanted = set(rows)
        for s in _walk_rows(corpus, shard, places):
            if s.row in wanted:
                out[s.row] = _sample(places, s.row, s.data, handler, verify)
                wanted.discard(s.row)
                if not wanted:
                    break
    else:
        for run in _runs(places, rows):
            start = int(places.offsets[run[0]])
            end = int(places.offsets[run[-1]] + places.sizes[run[-1]])
            try:
                blob = _read_range(shard.url, start, end)
            except OSError as e:
                handler(Skip(places.keys[run[0]], f"{shard.url}: unreadable bytes {start}-{end}: {e}"))
                continue
            for r in run:
                a = int(places.offsets[r]) - start
                data = blob[a:a + int(places.sizes[r])]
                if len(data) != places.sizes[r]:
                    handler(Skip(places.keys[r], f"{shard.url}: ends before the image's {places.sizes[r]} bytes"))
                    continue
                out[r] = _sample(places, r, data, handler, verify)
    return {r: s for r, s in out.items() if s is not None}


def _sample(places: ShardPlaces, r: int, data: bytes, handler, verify: bool = True) -> RawSample | None:
    want = int(places.crcs[r])
    if verify and want >= 0 and bytes_crc32(data) != want:
        handler(Skip(places.keys[r], f"its image bytes are not those extracted (CRC-32 {bytes_crc32(data):08x}, "
                                     f"recorded {want:08x}): the corpus changed under the store"))
        return None
    label = int(places.labels[r])
    return RawSample(places.keys[r], data, None if label < 0 else label, row=r, offset=int(places.offsets[r]),
                     size=int(places.sizes[r]))


def _runs(places: ShardPlaces, rows: list[int]) -> Iterator[list[int]]:
    """Rows grouped into runs whose bytes are in increasing order and at most ``GAP`` apart."""
    run = [rows[0]]
    for r in rows[1:]:
        prev = run[-1]
        end = places.offsets[prev] + places.sizes[prev]
        if 0 <= places.offsets[r] - end <= GAP:
            run.append(r)
        else:
            yield run
            run = [r]
    yield run


def _read_range(url: str, start: int, end: int) -> bytes:
    if is_url(url):
        import fsspec
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path, start=start, end=end)
    with open(url, "rb", buffering=0) as f:
        f.seek(start)
        return f.read(end - start)


def _read_file(path: str, places: ShardPlaces, r: int, handler) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        handler(Skip(places.keys[r], f"unreadable file: {e.strerror}"))
        return None


def _walk_rows(corpus: Corpus, shard: CorpusShard, places: ShardPlaces) -> Iterator[RawSample]:
    """A shard's stored rows by walking it from the start (its keys are the places' keys)."""
    from .walk import shard_samples, screen
    keys, known, row = places.keys, set(places.keys), 0
    for s in screen(shard_samples(corpus, shard)):
        if isinstance(s, Skip) or s.key not in known:
            continue
        if row < len(keys) and s.key == keys[row]:
            yield RawSample(s.key, s.data, s.label, s.fields, s.error, row, s.offset, s.size)
            row += 1
