"""Image corpora: webdataset tar shards or an image folder, local or behind an fsspec URL.

A corpus is a sorted list of shards; a shard's name (its file name without extension, or
``part-NNNNNN`` for image folders) is the name of its store shard, so shard ids are stable
across runs, ranks and teams. Tar shards are read with webdataset's tar iterators.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

import braceexpand
import fsspec
import webdataset.tariterators as wds_tar

from kdcache.store import KdcacheError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm")
FOLDER_SHARD_SIZE = 1000


class CorpusError(KdcacheError):
    """The corpus is missing, empty or unreadable."""


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
    error: str | None = None  # why the bytes could not be read at all


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

    def fingerprint(self) -> str:
        """Identifies the corpus by its shard names and members (not by where it is mounted)."""
        desc = [(s.name, list(s.members)) for s in self.shards]
        return hashlib.sha256(json.dumps([self.kind, desc]).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "shards": len(self.shards),
                "fingerprint": self.fingerprint(), "classes": list(self.classes)}

    def shard(self, name: str) -> CorpusShard:
        for s in self.shards:
            if s.name == name:
                return s
        raise CorpusError(f"{self.spec}: no corpus shard named {name!r}")

    def samples(self, shard: CorpusShard) -> Iterator[RawSample | ShardReadError]:
        """The shard's samples in corpus order."""
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
            files = wds_tar.tar_file_expander([{"stream": stream, "url": url}], eof_value=None)
            for s in wds_tar.group_by_keys(files):
                yield _raw_sample(s)
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors...: the rest is lost
        yield ShardReadError(f"{url}: tar read error: {type(e).__name__}: {e.args[0] if e.args else e}")


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
    return RawSample(s["__key__"], data, label, fields)


def resolve_corpus(spec: str, *, folder_shard_size: int = FOLDER_SHARD_SIZE) -> Corpus:
    """DATA as the CLI takes it -> Corpus.

    Accepts a directory of ``.tar`` shards, a single tar, a brace pattern
    (``train-{000000..000099}.tar``), a glob, an fsspec URL of any of these, or an image
    folder (class sub-folders give labels).
    """
    spec = str(spec)
    if "://" in spec and not spec.startswith("file://"):
        return _tar_corpus(spec, _remote_tars(spec))
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if "{" in path or any(c in path for c in "*?["):
        urls = sorted({p for pat in braceexpand.braceexpand(path) for p in (glob.glob(pat) if any(c in pat for c in "*?[") else [pat])})
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise CorpusError(f"{spec}: {len(missing)} shard(s) missing, first {missing[0]}")
        return _tar_corpus(spec, urls)
    if not os.path.exists(path):
        raise CorpusError(f"{spec}: no such file or directory")
    if os.path.isfile(path):
        return _tar_corpus(spec, [path])
    tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
    if tars:
        return _tar_corpus(spec, tars)
    return _folder_corpus(spec, path, folder_shard_size)


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


def _tar_corpus(spec: str, urls: list[str]) -> Corpus:
    if not urls:
        raise CorpusError(f"{spec}: no .tar shards found")
    names = [re.sub(r"\.tar$", "", u.rstrip("/").rsplit("/", 1)[-1]) for u in urls]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CorpusError(f"{spec}: shard names must be unique, {sorted(dup)[0]!r} appears twice")
    return Corpus(spec, "tar", tuple(CorpusShard(n, u) for n, u in zip(names, urls)))


def _folder_corpus(spec: str, root: str, shard_size: int) -> Corpus:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not f.startswith("."):
                files.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    if not files:
        raise CorpusError(f"{spec}: empty corpus: no .tar shards and no image files")
    files.sort()
    classes = tuple(sorted({f.split("/", 1)[0] for f in files if "/" in f}))
    shards = tuple(CorpusShard(f"part-{i // shard_size:06d}", root, tuple(files[i:i + shard_size]))
                   for i in range(0, len(files), shard_size))
    return Corpus(spec, "folder", shards, classes)
