"""Validation of everything a store says about itself, before anything is sized from it.

A store is read by strangers, so its metadata is input: the root description (``kdcache``
attribute), each shard's attributes, and the names of shards and teachers. Every check names
the store, the shard and the field in one line (``StoreError``); nothing is allocated from a
number that has not passed a range check here, and no name can point outside the store.
"""
from __future__ import annotations

import math
import re
import unicodedata

from kdcache.errors import StoreError

from .dtypes import STORAGE_DTYPES
from .meta import CODECS, INDEX_DTYPES, INTERPOLATIONS, MAX_PIXEL_SIZE, PIXEL_FORMATS, TOKEN_KINDS, index_dtype

MAX_VIEWS = 1024
MAX_DIM = 1 << 16
MAX_GRID = 4096
MAX_CODES = 4096
MAX_CLASSES = 1 << 24
MAX_DENSE_SCALE = 8  # extract --dense-scale: a whole-image map at up to 8x the teacher input
MAX_ROWS = 1 << 31
MAX_SAMPLE_BYTES = 1 << 32  # 4 GiB of features per sample: beyond any real teacher
HEX64 = re.compile(r"^[0-9a-f]{64}$")
RESERVED_NAMES = {"keys", "views", "origin", "pixels", "shards", "quantizers", "stats", "leases"}


def name_problem(name) -> str | None:
    """Why ``name`` cannot name a shard or a teacher (a path component inside the store)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if len(name) > 255:
        return "longer than 255 characters"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with '.'"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "contains control characters"
    return None


def check_name(name, where: str, what: str) -> str:
    problem = name_problem(name)
    if problem:
        raise StoreError(f"{where}: {what} name {name!r} {problem}")
    return name


class _Fields:
    """Typed accessors over one dict of metadata, each error naming ``where`` and the field."""

    def __init__(self, d, where: str):
        if not isinstance(d, dict):
            raise StoreError(f"{where}: expected a JSON object, got {type(d).__name__}")
        self.d, self.where = d, where

    def _bad(self, key, want):
        v = self.d.get(key, "<missing>")
        raise StoreError(f"{self.where}: field {key!r} is {_short(v)}, expected {want}")

    def int(self, key, lo: int, hi: int, *, default=None) -> int:
        v = self.d.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            self._bad(key, f"an integer in {lo}..{hi}")
        return v

    def number(self, key, lo: float, hi: float, *, default=None, open_low: bool = False) -> float:
        v = self.d.get(key, default)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        if not ok or (open_low and v == lo):
            self._bad(key, f"a number in {'(' if open_low else '['}{lo}, {hi}]")
        return float(v)

    def str(self, key, *, default=None, choices=None) -> str:
        v = self.d.get(key, default)
        if not isinstance(v, str) or (choices and v not in choices):
            self._bad(key, f"one of {', '.join(choices)}" if choices else "a string")
        return v

    def bool(self, key, *, default=None) -> bool:
        v = self.d.get(key, default)
        if not isinstance(v, bool):
            self._bad(key, "true or false")
        return v

    def ints(self, key, n: int, lo: int, hi: int) -> tuple:
        v = self.d.get(key)
        if not isinstance(v, list) or len(v) != n or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v):
            self._bad(key, f"a list of {n} integers in {lo}..{hi}")
        return tuple(v)

    def numbers(self, key, n: int, lo: float, hi: float) -> tuple:
        v = self.d.get(key)
        if not isinstance(v, list) or len(v) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi for x in v):
            self._bad(key, f"a list of {n} numbers in [{lo}, {hi}]")
        return tuple(float(x) for x in v)

    def dict(self, key, *, default=None) -> dict:
        v = self.d.get(key, default)
        if not isinstance(v, dict):
            self._bad(key, "a JSON object")
        return v


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def check_root(d, where: str) -> dict:
    """The root ``kdcache`` attribute, checked field by field; returns it unchanged."""
    f = _Fields(d, where)
    views = f.int("views", 1, MAX_VIEWS)
    f.int("seed", 0, (1 << 63) - 1)
    f.str("created_by")
    vp = _Fields(f.dict("view_policy"), f"{where}: view_policy")
    if vp.int("views", 1, MAX_VIEWS) != views:
        raise StoreError(f"{where}: view_policy.views {vp.d['views']} differs from views {views}")
    vp.int("seed", 0, (1 << 63) - 1)
    vp.number("crop_pct", 0.0, 1.0, open_low=True)
    vp.number("aspect", 0.0, 1e4, open_low=True)
    vp.numbers("scale", 2, 0.0, 1.0)
    vp.numbers("ratio", 2, 1e-4, 1e4)
    vp.number("flip", 0.0, 1.0)
    vp.str("kind")
    teachers = f.dict("teachers")
    for name, t in teachers.items():
        check_name(name, f"{where}: teachers", "teacher")
        if name in RESERVED_NAMES:
            raise StoreError(f"{where}: teacher name {name!r} is reserved")
        check_teacher(t, f"{where}: teacher {name}", views)
    _Fields(f.dict("corpus", default={}), f"{where}: corpus")
    f.dict("summary", default={})
    if d.get("pixels") is not None:
        pf = _Fields(f.dict("pixels"), f"{where}: pixels")
        pf.ints("size", 2, 8, MAX_PIXEL_SIZE)
        pf.str("format", choices=PIXEL_FORMATS)
        pf.int("quality", 1, 100)
        pf.str("interpolation", choices=INTERPOLATIONS)
        h, w = d["pixels"]["size"]
        if views * h * w * 3 > MAX_SAMPLE_BYTES:
            raise StoreError(f"{where}: pixels: {views} views of {h}x{w} are more bytes per sample than kdcache reads")
    return d


def check_teacher(d, where: str, views: int) -> None:
    f = _Fields(d, where)
    f.str("model")
    f.str("weights_sha256")
    f.ints("input_size", 3, 1, 1 << 16)
    f.numbers("mean", 3, -1e3, 1e3)
    std = f.numbers("std", 3, 0.0, 1e3)
    if min(std) <= 0:
        f._bad("std", "three numbers > 0")
    f.str("interpolation", choices=INTERPOLATIONS)
    f.number("crop_pct", 0.0, 1.0, open_low=True)
    f.ints("patch_size", 2, 1, 1 << 16)
    grid = f.ints("grid", 2, 1, MAX_GRID)
    dim = f.int("dim", 1, MAX_DIM)
    tokens = f.int("tokens", 1, MAX_GRID * MAX_GRID)
    if tokens != grid[0] * grid[1]:
        raise StoreError(f"{where}: field 'tokens' is {tokens}, but grid {list(grid)} has {grid[0] * grid[1]}")
    f.int("prefix_tokens", 0, 1 << 16)
    f.str("summary")
    dtype = f.str("dtype", choices=STORAGE_DTYPES)
    f.str("codec", choices=CODECS)
    per_sample = views * (tokens + 1) * dim * (4 if dtype == "float32" else 2)
    if per_sample > MAX_SAMPLE_BYTES:
        raise StoreError(f"{where}: {views} views x {tokens + 1} tokens x {dim} dims = {per_sample} bytes per sample, "
                         f"more than kdcache reads ({MAX_SAMPLE_BYTES})")
    logits = d.get("logits")
    if logits is not None:
        lf = _Fields(logits, f"{where}: logits")
        classes = lf.int("classes", 1, MAX_CLASSES)
        k = lf.int("k", 1, classes)
        if lf.str("index_dtype", choices=INDEX_DTYPES) != index_dtype(classes):
            lf._bad("index_dtype", f"{index_dtype(classes)} (the smallest type holding {classes} classes)")
        per_sample += views * (k * (4 if dtype == "float32" else 2) + k * 4 + 4)
        if per_sample > MAX_SAMPLE_BYTES:
            raise StoreError(f"{where}: {per_sample} bytes per sample with the logits, more than kdcache reads "
                             f"({MAX_SAMPLE_BYTES})")
    dense = d.get("dense")
    if dense is not None:
        df = _Fields(dense, f"{where}: dense")
        scale = df.int("scale", 1, MAX_DENSE_SCALE)
        dg = df.ints("grid", 2, 1, MAX_GRID * MAX_DENSE_SCALE)
        if tuple(dg) != (grid[0] * scale, grid[1] * scale):
            df._bad("grid", f"[{grid[0] * scale}, {grid[1] * scale}] (scale x the patch grid)")
        per_sample += dg[0] * dg[1] * dim * (4 if dtype == "float32" else 2)
        if per_sample > MAX_SAMPLE_BYTES:
            raise StoreError(f"{where}: {per_sample} bytes per sample with the dense map, more than kdcache reads "
                             f"({MAX_SAMPLE_BYTES})")
    q = d.get("quantizer")
    if q is not None:
        if not isinstance(q, dict):
            f._bad("quantizer", "null or a JSON object")
        for kind, spec in q.items():
            if kind not in TOKEN_KINDS:
                raise StoreError(f"{where}: quantizer kind {kind!r} is not cls or patch")
            qf = _Fields(spec, f"{where}: quantizer {kind}")
            qf.int("m", 1, MAX_CODES)
            qf.str("method")
            qf.bool("keep_float", default=False)
    f.dict("model_kwargs", default={})
    f.bool("pretrained", default=False)
    if d.get("checkpoint") is not None:
        f.str("checkpoint")


def check_shard_attrs(d, where: str, *, array_paths) -> dict:
    """A shard's attributes. ``array_paths``: the arrays a digest may name (keys, views, teachers')."""
    f = _Fields(d, where)
    complete = f.bool("complete", default=False)
    if not complete:
        return d
    f.int("count", 0, MAX_ROWS)
    if "block" in d:  # rows per block (format 3)
        f.int("block", 1, MAX_ROWS)
    failed = d.get("failed", [])
    if not isinstance(failed, list) or not all(
            isinstance(x, dict) and isinstance(x.get("key"), str) and isinstance(x.get("error"), str) for x in failed):
        f._bad("failed", "a list of {key, error} objects")
    digest = f.dict("digest", default={})
    for path, h in digest.items():
        if path not in array_paths:
            raise StoreError(f"{where}: digest names {_short(path)}, which is not an array of this store")
        if not isinstance(h, str) or not HEX64.match(h):
            raise StoreError(f"{where}: digest of {path} is {_short(h)}, expected 64 hex digits")
    if "binding" in d and not (isinstance(d["binding"], str) and HEX64.match(d["binding"])):
        f._bad("binding", "64 hex digits")
    blocks = d.get("block_crc32")
    if blocks is not None:
        bf = _Fields(blocks, f"{where}: block_crc32")
        for path, crcs in blocks.items():
            if path not in array_paths:
                raise StoreError(f"{where}: block_crc32 names {_short(path)}, which is not an array of this store")
            if not isinstance(crcs, list) or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 32 for c in crcs):
                bf._bad(path, "a list of CRC-32 values")
    return d
