"""Image corpora: webdataset tar shards or an image folder, local or behind an fsspec URL.

A corpus is a sorted list of shards; a shard's name (its file name without extension, or
``part-NNNNNN`` for image folders) is the name of its store shard, so shard ids are stable
across runs, ranks and teams. Tar members are read with webdataset's tar iterator and grouped
into samples by key here (webdataset's ``group_by_keys`` drops members whose name has no key,
such as ``...jpg``, without a word; kdcache must record every sample it does not store).

``ReadOptions`` is everything a reader needs to rebuild exactly the shards and samples that
extraction saw; extraction records it in the store (``corpus``), and ``verify --data`` and
``train --data`` read the corpus back with it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import braceexpand
import fsspec
import webdataset.tariterators as wds_tar

from kdcache.store import KdcacheError

from .decode import DecodeOptions

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm")
FOLDER_SHARD_SIZE = 1000
KEY_RULES = "unique-safe/v1"  # see data.walk: keys non-empty, no '.'/'..' segment, no control chars; first of a duplicate kept


class CorpusError(KdcacheError):
    """The corpus is missing, empty or unreadable."""


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
class RawSample:
    key: str
    data: bytes | None  # None when the sample has no image field
    label: int | None
    fields: tuple[str, ...] = ()
    error: str | None = None  # why the sample cannot be used at all (unreadable file, member without a key)


@dataclass(frozen=True)
class ShardReadError:
    """Yielded in place of samples when a tar shard breaks off (truncated or corrupt tar)."""

    error: str


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

    def samples(self, shard: CorpusShard) -> Iterator[RawSample | ShardReadError]:
        """The shard's raw samples in corpus order (no key rules applied: see data.walk)."""
        if self.kind == "folder":
            yield from self._folder_samples(shard)
        else:
            yield from _tar_samples(shard.url)

    def _folder_samples(self, shard):
        for rel in shard.members:
            key = os.path.splitext(rel)[0]
            top = rel.split("/", 1)[0] if "/" in rel else None
            label = self.classes.index(top) if top in self.classes else None
            try:
                with open(os.path.join(shard.url, rel), "rb") as f:
                    data = f.read()
            except OSError as e:
                yield RawSample(key, None, label, error=f"unreadable file: {e.strerror}")
                continue
            yield RawSample(key, data, label, (os.path.splitext(rel)[1][1:].lower(),))


def _tar_samples(url: str):
    try:
        with fsspec.open(url, "rb") as stream:
            yield from _group_members(wds_tar.tar_file_iterator(stream))
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors...: the rest is lost
        yield ShardReadError(f"{url}: tar read error: {type(e).__name__}: {e.args[0] if e.args else e}")


def _group_members(members) -> Iterator[RawSample]:
    """Consecutive members with the same key form a sample (webdataset's convention: the key is
    the name up to the first dot of its last path component). A member whose name has no key,
    or that repeats a field of its sample, becomes a recorded bad sample instead of vanishing."""
    current: dict | None = None
    for m in members:
        name, data = m["fname"], m["data"]
        key, ext = wds_tar.base_plus_ext(name)
        if key is None:
            if current is not None:
                yield _raw_sample(current)
                current = None
            yield RawSample(name.rsplit(".", 1)[0] or name, None, None, error=f"tar member {name!r} has no sample key")
            continue
        ext = ext.lower()
        if current is not None and key == current["__key__"] and ext in current:
            current["__error__"] = f"tar member {name!r} repeats field {ext!r} of its sample"
            continue
        if current is None or key != current["__key__"]:
            if current is not None:
                yield _raw_sample(current)
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield _raw_sample(current)


def _raw_sample(s: dict) -> RawSample:
    fields = tuple(k for k in s if not k.startswith("__"))
    data = next((s[e] for e in IMAGE_EXTS if e in s), None)
    label = None
    for f in ("cls", "label"):
        if f in s:
            try:
                label = int(s[f].decode().strip())
            except (ValueError, UnicodeDecodeError):
                pass
            break
    return RawSample(s["__key__"], data, label, fields, error=s.get("__error__"))


def resolve_corpus(spec: str, options: ReadOptions | None = None) -> Corpus:
    """DATA as the CLI takes it -> Corpus.

    Accepts a directory of ``.tar`` shards, a single tar, a brace pattern
    (``train-{000000..000099}.tar``), a glob, an fsspec URL of any of these, or an image
    folder (class sub-folders give labels, ``options.folder_shard_size`` files per shard).
    """
    spec, options = str(spec), options or ReadOptions()
    if "://" in spec and not spec.startswith("file://"):
        return _tar_corpus(spec, _remote_tars(spec), options)
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if "{" in path or any(c in path for c in "*?["):
        urls = sorted({p for pat in braceexpand.braceexpand(path) for p in (glob.glob(pat) if any(c in pat for c in "*?[") else [pat])})
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise CorpusError(f"{spec}: {len(missing)} shard(s) missing, first {missing[0]}")
        return _tar_corpus(spec, urls, options)
    if not os.path.exists(path):
        raise CorpusError(f"{spec}: no such file or directory")
    if os.path.isfile(path):
        return _tar_corpus(spec, [path], options)
    tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
    if tars:
        return _tar_corpus(spec, tars, options)
    return _folder_corpus(spec, path, options)


def _remote_tars(spec: str) -> list[str]:
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
