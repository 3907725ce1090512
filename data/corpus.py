"""Image corpora: webdataset tar shards or an image folder, local or behind an fsspec URL.

A corpus is a sorted list of shards; a shard's name (its file name without extension, or
``part-NNNNNN`` for image folders) is the name of its store shard, so shard ids are stable
across runs, ranks and teams. This module says what a corpus is (its shards, its fingerprint,
how to read it back); reading a shard's samples is the walk's job (``data.walk``).

``ReadOptions`` is everything a reader needs to rebuild exactly the shards and samples that
extraction saw (the folder shard size, the decode limits, the key rules); extraction records it
in the store (``corpus``), and ``verify --data`` and ``train --data`` read the corpus back with it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import braceexpand

from kdcache.errors import KdcacheError
from kdcache.store.remote import is_url, local_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm")
FOLDER_SHARD_SIZE = 1000
KEY_RULES = "unique-safe/v1"  # see data.walk: keys non-empty, no '.'/'..' segment, no control chars; first of a duplicate kept


MAX_PIXELS = 64_000_000  # an 8k x 8k photo passes, a decompression bomb does not
MIN_SIZE = 2
DECODE_MODES = ("reduced", "full")  # --decode: JPEGs at the scale the crops need, or always at full size


class CorpusError(KdcacheError):
    """The corpus is missing, empty or unreadable."""


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded (``data.pixels``): the limits, and whether JPEGs are decoded at a
    reduced scale; recorded in the store (``corpus.decode``) so the trainer decodes exactly as
    extraction did."""

    max_pixels: int = MAX_PIXELS
    min_size: int = MIN_SIZE
    # JPEGs decoded at the smallest of 1/1, 1/2, 1/4, 1/8 that still gives every crop at least its
    # output size (libjpeg's DCT scaling): views are fractions of the image, so the boxes are the same
    reduced: bool = True

    def __post_init__(self):
        for name in ("max_pixels", "min_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CorpusError(f"decode option {name!r}: {v!r} is not a positive integer")
        if not isinstance(self.reduced, bool):
            raise CorpusError(f"decode option 'reduced': {self.reduced!r} is not true or false")

    def to_dict(self) -> dict:
        return {"max_pixels": self.max_pixels, "min_size": self.min_size, "reduced": self.reduced}

    @classmethod
    def from_dict(cls, d: dict | None) -> "DecodeOptions":
        """From a store's ``corpus.decode``; stores written before ``reduced`` was recorded were
        extracted from full-size decodes, and are read the same way."""
        if d is None:
            return cls(reduced=False)
        if not isinstance(d, dict):
            raise CorpusError(f"corpus.decode {d!r} is not a JSON object")
        unknown = sorted(set(d) - {"max_pixels", "min_size", "reduced"})
        if unknown:
            raise CorpusError(f"corpus.decode: unknown option {unknown[0]!r} (not written by this kdcache)")
        return cls(**{"reduced": False, **d})


@dataclass(frozen=True)
class ReadOptions:
    """How a corpus is turned into shards and samples; recorded in the store's ``corpus``."""

    folder_shard_size: int = FOLDER_SHARD_SIZE
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    key_rules: str = KEY_RULES

    def __post_init__(self):
        if not isinstance(self.folder_shard_size, int) or self.folder_shard_size < 1:
            raise CorpusError(f"--folder-shard-size {self.folder_shard_size!r}: need a positive integer")
        if self.key_rules != KEY_RULES:
            raise CorpusError(f"corpus key rules {self.key_rules!r} are not known to this kdcache (it applies {KEY_RULES})")

    def to_dict(self) -> dict:
        return {"folder_shard_size": self.folder_shard_size, "decode": self.decode.to_dict(), "key_rules": self.key_rules}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReadOptions":
        """From a store's ``corpus`` description (stores written before these were recorded
        fall back to the defaults they were extracted with)."""
        d = d if isinstance(d, dict) else {}
        return cls(folder_shard_size=d.get("folder_shard_size", FOLDER_SHARD_SIZE),
                   decode=DecodeOptions.from_dict(d.get("decode")), key_rules=d.get("key_rules", KEY_RULES))


@dataclass(frozen=True)
class CorpusShard:
    """One corpus shard: a tar file, or a fixed run of files of an image folder."""

    name: str
    url: str
    members: tuple[str, ...] = ()  # image folder: paths relative to ``url``


@dataclass(frozen=True)
class Corpus:
    spec: str
    kind: str  # "tar" | "folder"
    shards: tuple[CorpusShard, ...]
    classes: tuple[str, ...] = ()
    options: ReadOptions = field(default_factory=ReadOptions)

    def fingerprint(self) -> str:
        """Identifies the corpus by its shard names and members (not by where it is mounted)."""
        desc = [(s.name, list(s.members)) for s in self.shards]
        return hashlib.sha256(json.dumps([self.kind, desc]).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """The store's ``corpus`` attribute: what it is, and how to read it back."""
        return {"spec": self.spec, "kind": self.kind, "shards": len(self.shards), "fingerprint": self.fingerprint(),
                "classes": list(self.classes), **self.options.to_dict()}

    def shard(self, name: str) -> CorpusShard:
        for s in self.shards:
            if s.name == name:
                return s
        raise CorpusError(f"{self.spec}: no corpus shard named {name!r}")


def resolve_corpus(spec: str, options: ReadOptions | None = None) -> Corpus:
    """DATA as the CLI takes it -> Corpus.

    Accepts a directory of ``.tar`` shards, a single tar, a brace pattern
    (``train-{000000..000099}.tar``), a glob, an fsspec URL of any of these, or an image
    folder (class sub-folders give labels, ``options.folder_shard_size`` files per shard).
    """
    spec, options = str(spec), options or ReadOptions()
    if is_url(spec):
        return _tar_corpus(spec, _remote_tars(spec), options)
    path = local_path(spec)
    if "{" in path or any(c in path for c in "*?["):
        urls = sorted({p for pat in braceexpand.braceexpand(path) for p in (glob.glob(pat) if any(c in pat for c in "*?[") else [pat])})
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise CorpusError(f"{spec}: {len(missing)} shard(s) missing, first {missing[0]}")
        return _tar_corpus(spec, urls, options)
    if not os.path.exists(path):
        raise CorpusError(f"{spec}: no such file or directory")
    if os.path.isfile(path):
        import tarfile
        if not tarfile.is_tarfile(path):
            raise CorpusError(f"{spec}: a file that is not a tar; a corpus is a directory of webdataset tars, one tar, a "
                              f"brace pattern or glob of tars, or an image folder")
        return _tar_corpus(spec, [path], options)
    tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
    if tars:
        return _tar_corpus(spec, tars, options)
    return _folder_corpus(spec, path, options)


def _remote_tars(spec: str) -> list[str]:
    import fsspec
    fs, _, paths = fsspec.get_fs_token_paths(list(braceexpand.braceexpand(spec)) if "{" in spec else spec)
    proto = spec.split("://", 1)[0]
    out = []
    for p in paths:
        if fs.isdir(p):
            out += [f for f in fs.ls(p, detail=False) if f.endswith(".tar")]
        elif fs.exists(p):
            out.append(p)
    return sorted(f if "://" in f else f"{proto}://{f.lstrip('/')}" if proto != "memory" else f"memory://{f}" for f in out)


def _tar_corpus(spec: str, urls: list[str], options: ReadOptions) -> Corpus:
    if not urls:
        raise CorpusError(f"{spec}: no .tar shards found")
    names = [re.sub(r"\.tar$", "", u.rstrip("/").rsplit("/", 1)[-1]) for u in urls]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CorpusError(f"{spec}: shard names must be unique, {sorted(dup)[0]!r} appears twice")
    return Corpus(spec, "tar", tuple(CorpusShard(n, u) for n, u in zip(names, urls)), options=options)


def _folder_corpus(spec: str, root: str, options: ReadOptions) -> Corpus:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not f.startswith("."):
                files.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    if not files:
        raise CorpusError(f"{spec}: empty corpus: no .tar shards and no image files")
    files.sort()
    size = options.folder_shard_size
    classes = tuple(sorted({f.split("/", 1)[0] for f in files if "/" in f}))
    shards = tuple(CorpusShard(f"part-{i // size:06d}", root, tuple(files[i:i + size])) for i in range(0, len(files), size))
    return Corpus(spec, "folder", shards, classes, options=options)
