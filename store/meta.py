"""Store metadata: frozen dataclasses that round-trip through the JSON in ``zarr.json``.

Everything a reader needs to use a store without kdcache (or without the teachers) lives in
the root attribute ``kdcache``: the teachers' preprocessing and feature shapes, the view
policy, the corpus it came from. Nothing here is executable: plain JSON values only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kdcache.errors import StoreError

from .dtypes import zarr_dtype

# 3: each shard records where every sample's image is in its corpus shard (``origin``) and its rows per block;
# 2: each view of a block is its own Zarr shard (``view_shards``); 1: a block holds every view
FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, 4)
ORIGIN = "origin"  # (n, 4) int64 per shard: image byte offset and length in the corpus shard, their CRC-32, label (-1: none)
ORIGIN_COLUMNS = ("offset", "size", "crc32", "label")
INDEX_ARRAYS = ("keys", "views", ORIGIN)  # a shard's own arrays, beside the teachers' (no view axis)


@dataclass(frozen=True)
class Codec:
    """A lossless codec of the store's arrays (``--codec``): Blosc's compressor at a level, after a
    byte shuffle (it groups fp16 exponent bytes); ``none`` stores raw bytes. ``layout.compressors``
    turns it into zarr's codec."""
    name: str
    blosc: str | None = None  # Blosc's compressor name; None: no compression
    level: int = 0
    shuffle: str = "shuffle"


CODEC_REGISTRY = {c.name: c for c in (Codec("none"), Codec("lz4", "lz4", 5), Codec("zstd", "zstd", 3))}
AUTO_CODEC = "auto"  # per array, from its first block: lz4 where it saves, else none (``layout.resolved_codec``)
CODECS = (AUTO_CODEC, *CODEC_REGISTRY)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # how crops are resized (torchvision's modes of these names)
TOKEN_KINDS = ("cls", "patch")  # a teacher's stored token kinds: its summary vector, its patch tokens
LOGIT_ARRAYS = ("logits_values", "logits_indices", "logits_lse")  # a classifier teacher's top-K soft labels
INDEX_DTYPES = ("uint8", "uint16", "int32")  # class indices: the smallest type that holds the class count


def index_dtype(classes: int) -> str:
    """The smallest integer type that holds every class index of ``classes`` classes."""
    return "uint8" if classes <= 1 << 8 else "uint16" if classes <= 1 << 16 else "int32"


@dataclass(frozen=True)
class TeacherMeta:
    """What a teacher is and what its cached arrays hold.

    ``tokens`` is the number of patch tokens stored per view (``grid[0] * grid[1]``);
    ``prefix_tokens`` counts the class/register tokens the model emits that are *not* stored
    as patches (the summary vector is stored separately as ``cls``). ``logits`` is set when the
    teacher's top-K soft labels are stored too: ``{k, classes, index_dtype}``.
    """

    model: str
    weights_sha256: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    dim: int
    tokens: int
    prefix_tokens: int
    summary: str
    dtype: str
    codec: str
    quantizer: dict | None = None
    logits: dict | None = None  # {k, classes, index_dtype}: top-K logits and the log-sum-exp per view
    dense: dict | None = None  # {scale, grid}: one patch map per image of the whole image at scale x the input
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherMeta":
        d = dict(d)
        for k in ("input_size", "mean", "std", "patch_size", "grid"):
            d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def same_features(self, other: "TeacherMeta") -> bool:
        """True when two descriptions would produce the same cached arrays."""
        a, b = self.to_dict(), other.to_dict()
        for k in ("quantizer", "checkpoint", "pretrained"):
            a.pop(k), b.pop(k)
        return a == b


@dataclass(frozen=True)
class ViewPolicy:
    """How the K stored views of every image are drawn.

    View 0 is the teacher's eval view: a centred crop covering ``crop_pct`` of the short side
    (with the teacher's aspect ratio ``aspect = height / width``). Views 1..K-1 are
    RandomResizedCrop(scale, ratio) plus a horizontal flip with probability ``flip``, drawn
    from a generator seeded by ``(seed, key, view)``.
    """

    views: int = 1
    seed: int = 0
    crop_pct: float = 0.875
    aspect: float = 1.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    kind: str = "eval+rrc-flip/v1"

    @classmethod
    def for_input(cls, crop_pct: float, hw: tuple[int, int], *, views: int = 1, seed: int = 0) -> "ViewPolicy":
        """The policy of a model that takes ``hw`` (height, width) inputs and evaluates on the
        centred ``crop_pct`` box: its eval view keeps the model's aspect ratio."""
        return cls(views=views, seed=seed, crop_pct=crop_pct, aspect=hw[0] / hw[1])

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ViewPolicy":
        d = dict(d)
        d["scale"], d["ratio"] = tuple(d["scale"]), tuple(d["ratio"])
        return cls(**d)


PIXEL_FORMATS = ("jpeg", "raw")
PIXELS_JPEG, PIXEL_SPANS, PIXELS_RAW = "pixels/jpeg", "pixels/spans", "pixels/raw"
PIXEL_ARRAYS = (PIXELS_JPEG, PIXEL_SPANS, PIXELS_RAW)
DEFAULT_JPEG_QUALITY = 90
MAX_PIXEL_SIZE = 4096


@dataclass(frozen=True)
class PixelSpec:
    """How a store keeps its views' pixels (``extract --pixels``): every stored view's crop, as the
    teacher saw it (cut, flipped, before normalisation), resized to ``size`` (height, width) with
    ``interpolation``; as a JPEG of ``quality`` (``pixels/jpeg``, a byte heap, with each view's
    ``pixels/spans``: offset and length in it) or raw (``pixels/raw``, (n, K, H, W, 3) uint8)."""

    size: tuple[int, int]
    format: str = "jpeg"
    quality: int = DEFAULT_JPEG_QUALITY
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.format not in PIXEL_FORMATS:
            raise StoreError(f"pixels format {self.format!r}: expected one of {', '.join(PIXEL_FORMATS)}")
        if not (len(self.size) == 2 and all(isinstance(x, int) and 8 <= x <= MAX_PIXEL_SIZE for x in self.size)):
            raise StoreError(f"pixels size {self.size!r}: two integers in 8..{MAX_PIXEL_SIZE}")
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise StoreError(f"pixels quality {self.quality!r}: an integer in 1..100")
        if self.interpolation not in INTERPOLATIONS:
            raise StoreError(f"pixels interpolation {self.interpolation!r}: one of {', '.join(INTERPOLATIONS)}")

    def to_dict(self) -> dict:
        return {"size": list(self.size), "format": self.format, "quality": self.quality,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "PixelSpec":
        return cls(size=tuple(d["size"]), format=d["format"], quality=d["quality"], interpolation=d["interpolation"])

    @classmethod
    def parse(cls, text: str, *, default_size: tuple[int, int], interpolation: str) -> "PixelSpec":
        """``[SIZE][:jpeg[QUALITY]|:raw]``: ``224``, ``64:raw``, ``jpeg95``, ``:jpeg80``, ``""`` (the
        first teacher's input, JPEG at the default quality)."""
        size_text, _, fmt = (text or "").strip().partition(":")
        if not fmt and size_text and not size_text[0].isdigit():  # ("jpeg95", "raw": no size given)
            size_text, fmt = "", size_text
        try:
            size = (int(size_text), int(size_text)) if size_text else tuple(default_size)
        except ValueError:
            raise StoreError(f"--pixels {text!r}: expected [SIZE][:jpeg[QUALITY]|:raw], e.g. 224, 64:raw, 224:jpeg95")
        fmt = fmt or "jpeg"
        if fmt == "raw":
            return cls(size=size, format="raw", interpolation=interpolation)
        if not fmt.startswith("jpeg") or not (fmt[4:].isdigit() or fmt == "jpeg"):
            raise StoreError(f"--pixels {text!r}: the format is jpeg[QUALITY] or raw, e.g. 224:jpeg95")
        return cls(size=size, format="jpeg", quality=int(fmt[4:]) if fmt[4:] else DEFAULT_JPEG_QUALITY,
                   interpolation=interpolation)

    def arrays(self, views: int) -> dict[str, tuple[tuple, str]]:
        """The row arrays a shard holds for them: path -> (row shape, zarr dtype); the JPEG heap
        (``PIXELS_JPEG``, one byte per row of its own) comes beside ``PIXEL_SPANS``."""
        if self.format == "raw":
            return {PIXELS_RAW: ((views, *self.size, 3), "uint8")}
        return {PIXEL_SPANS: ((views, 2), "int64")}


def has_pixels(digest: dict) -> bool:
    """A shard holds its views' pixels once their arrays are in its digest."""
    return PIXELS_JPEG in digest or PIXELS_RAW in digest


@dataclass(frozen=True)
class StoreMeta:
    """The root description of a store (``attrs["kdcache"]`` of the root group)."""

    view_policy: ViewPolicy
    teachers: dict[str, TeacherMeta]
    corpus: dict[str, Any]
    created_by: str
    format: int = FORMAT_VERSION
    summary: dict = field(default_factory=dict)
    pixels: PixelSpec | None = None  # extract --pixels: every view's crop is stored too (store format 3)

    @property
    def views(self) -> int:
        return self.view_policy.views

    @property
    def view_shards(self) -> bool:
        """Whether writers store each view of a block as its own Zarr shard (format 2), so a
        reader of one view reads 1/K of the bytes; a format-1 store keeps whole blocks, so the
        kdcache that wrote it can still read every array added to it."""
        return self.format >= 2

    @property
    def records_origin(self) -> bool:
        """Whether writers record each sample's place in its corpus shard (``origin``, format 3)."""
        return self.format >= 3

    @property
    def binds_shards(self) -> bool:
        """Whether every complete shard's record is bound to its name (``binding``, format 4): a
        reader then refuses a complete shard without one."""
        return self.format >= 4

    @property
    def seed(self) -> int:
        return self.view_policy.seed

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "created_by": self.created_by,
            "views": self.views,
            "seed": self.seed,
            "view_policy": self.view_policy.to_dict(),
            "teachers": {n: t.to_dict() for n, t in self.teachers.items()},
            "corpus": _jsonable(self.corpus),
            "summary": _jsonable(self.summary),
            **({"pixels": self.pixels.to_dict()} if self.pixels is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "store") -> "StoreMeta":
        if not isinstance(d, dict):
            raise StoreError(f"{where}: the 'kdcache' attribute is not a JSON object")
        fmt = d.get("format")
        if fmt not in READABLE_FORMATS or isinstance(fmt, bool):
            raise StoreError(f"{where}: store format {fmt!r} is not supported (this kdcache reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))})")
        from .schema import check_root
        check_root(d, where)
        return cls(
            view_policy=ViewPolicy.from_dict(d["view_policy"]),
            teachers={n: TeacherMeta.from_dict(t) for n, t in d["teachers"].items()},
            corpus=d.get("corpus", {}),
            created_by=d.get("created_by", "?"),
            format=fmt,
            summary=d.get("summary", {}),
            pixels=PixelSpec.from_dict(d["pixels"]) if d.get("pixels") is not None else None,
        )

    def replace(self, **changes) -> "StoreMeta":
        return dataclasses.replace(self, **changes)


def teacher_arrays(name: str, t: TeacherMeta, views: int) -> dict[str, tuple[tuple, str, dict]]:
    """The arrays a shard holds for teacher ``name``: path -> (row shape, zarr dtype, attrs).

    Float features are ``cls``/``patch``; a quantized token kind ``X`` is stored as ``X_codes``
    (uint8, one byte per codebook) instead, or beside the floats when ``keep_float``.
    """
    shapes = dict(zip(TOKEN_KINDS, ((views, t.dim), (views, t.tokens, t.dim))))
    out = {}
    for kind, shape in shapes.items():
        q = (t.quantizer or {}).get(kind)
        if q is None or q.get("keep_float"):
            out[feature_path(name, kind)] = (shape, zarr_dtype(t.dtype), {"logical_dtype": t.dtype})
        if q is not None:
            out[feature_path(name, kind, codes=True)] = ((*shape[:-1], q["m"]), "uint8", {"quantizer": quantizer_path(name, kind)})
    if t.dense:  # one map per image (no view axis); quantized with the patch tokens' codebooks when they are
        q = (t.quantizer or {}).get("patch")
        tokens = t.dense["grid"][0] * t.dense["grid"][1]
        if q is None or q.get("keep_float"):
            out[dense_path(name)] = ((tokens, t.dim), zarr_dtype(t.dtype), {"logical_dtype": t.dtype})
        if q is not None:
            out[dense_path(name, codes=True)] = ((tokens, q["m"]), "uint8", {"quantizer": quantizer_path(name, "patch")})
    if t.logits:  # the top-K logits (storage dtype), their class indices, and the log-sum-exp of all logits (float32)
        k = t.logits["k"]
        values, indices, lse = (logits_path(name, part) for part in LOGIT_ARRAYS)
        out[values] = ((views, k), zarr_dtype(t.dtype), {"logical_dtype": t.dtype})
        out[indices] = ((views, k), t.logits["index_dtype"], {"classes": t.logits["classes"]})
        out[lse] = ((views,), "float32", {})
    return out


# Paths inside a store. Only store/ builds them; other packages name arrays with feature_path.
SHARDS = "shards"


def feature_path(teacher: str, kind: str, *, codes: bool = False) -> str:
    """The array of a teacher's ``cls`` or ``patch`` features inside a shard (or its codes)."""
    return f"{teacher}/{kind}_codes" if codes else f"{teacher}/{kind}"


def dense_path(teacher: str, *, codes: bool = False) -> str:
    """A teacher's dense maps inside a shard (``extract --dense-scale``), or their codes."""
    return f"{teacher}/dense_codes" if codes else f"{teacher}/dense"


def has_view_axis(path: str) -> bool:
    """Whether a shard array's axis 1 is the view axis that format 2 splits: the teachers' per-view
    arrays (not keys, the views' boxes, or dense maps)."""
    return path not in INDEX_ARRAYS and path != PIXELS_JPEG and not per_image(path)


def per_view_shards(path: str, *, views: int, view_shards: bool) -> bool:
    """Whether writers give array ``path`` one Zarr shard per (block, view): in a format-2 store
    (``view_shards``) of K > 1 views, every array with a view axis."""
    return view_shards and views > 1 and has_view_axis(path)


def per_image(path: str) -> bool:
    """Whether an array has one row per image (a dense map) rather than one per stored view."""
    return path.rsplit("/", 1)[-1] in ("dense", "dense_codes")


def logits_path(teacher: str, part: str) -> str:
    """A teacher's soft-label array inside a shard: ``part`` is one of ``LOGIT_ARRAYS``."""
    return f"{teacher}/{part}"


def quantizer_path(teacher: str, kind: str) -> str:
    return f"quantizers/{teacher}/{kind}"


def stats_path(teacher: str, kind: str) -> str:
    return f"stats/{teacher}/{kind}"


def has_teacher(digest: dict, teacher: str) -> bool:
    """A shard holds a teacher once its patch array (float or codes) is in the digest."""
    return feature_path(teacher, "patch") in digest or feature_path(teacher, "patch", codes=True) in digest


def _jsonable(x):
    """Tuples to lists, recursively, so a dict compares equal after a JSON round trip."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
