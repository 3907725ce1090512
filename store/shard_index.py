"""The shard index: one object at the store's root that summarises its complete shards.

Without it, every reader reads every shard's metadata before its first step: one request per
shard, which on object storage makes start-up grow with the shard count. With it, a reader
lists ``shards/`` (one request per 1,000 names on S3) and reads this one object; only shards
missing from the index are asked one by one.

``shard_index.json`` = ``{"format": 1, "written": ISO time, "shards": {name: entry}}``, one
entry per complete shard: ``{count, failures, digest, nbytes, block, checksums, failed, binding}``
(``nbytes``: bytes stored per array; ``block``: rows per block, format 3; ``checksums``, ``failed``
and ``binding``, format 4: the sha256 of its block checksums and of its failures, and the shard's
binding, ``layout.shard_binding``, which the other fields hash to: an entry edited on its own is
ignored with a warning); the root metadata, read on open anyway, records its sha256 (``kdcache_shard_index``),
so an index changed on its own is known at once. It is written last, from the shards' own metadata, by whoever finishes a pass over the
store (rank 0 at the end of an extraction or quantization, every ``store`` operation, ``store
stats``); a job that completes shards merges their entries when it ends, under a short lease.

The index is a cache, never an authority. A reader plans with it (which shards are complete,
their counts, their teachers, their sizes) and checks each shard's own metadata when it reads
the shard: a stale or tampered entry is then ignored with a warning and the shard's metadata
wins. An index that does not parse or validate is ignored as a whole, with a warning; a store
without one (written before it existed) is read shard by shard, as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time

from kdcache.errors import StoreError

from .layout import binding_of, record_digests
from .lease import new_owner
from .schema import HEX64, check_name

INDEX_KEY = "shard_index.json"
INDEX_ATTR = "kdcache_shard_index"  # root attribute: {sha256, shards} of the index object (beside ``kdcache``)
INDEX_FORMAT = 1
MAX_INDEX_BYTES = 1 << 28  # about 100,000 shards; a larger object is not read (hostile, or not ours)
INDEX_LEASE = ".shard_index"  # not a shard name: those never start with "."

log = logging.getLogger("kdcache.store")


def entry_of(attrs: dict, nbytes: dict[str, int]) -> dict:
    """The index entry of a complete shard, from its (validated) attributes."""
    entry = {"count": int(attrs["count"]), "failures": len(attrs.get("failed", [])),
             "digest": dict(attrs.get("digest", {})), "nbytes": {k: int(v) for k, v in nbytes.items()}}
    if "block" in attrs:  # rows per block (format 3): what a reader plans its reads with
        entry["block"] = int(attrs["block"])
    if "binding" in attrs:  # format 4: the shard's binding and the two parts of its record the entry lacks
        entry.update(record_digests(attrs), binding=attrs["binding"])
    return entry


def entry_is_bound(name: str, entry: dict) -> bool:
    """Whether an entry hashes to the binding it records (always true of an entry without one)."""
    if "binding" not in entry:
        return True
    return binding_of(name, entry["count"], entry.get("block"), entry["digest"], entry.get("checksums"),
                      entry.get("failed")) == entry["binding"]


def agrees(entry: dict, attrs: dict | None) -> bool:
    """Whether an index entry says what the shard's own metadata says."""
    return (attrs is not None and attrs.get("complete") is True and entry["count"] == attrs.get("count")
            and entry["failures"] == len(attrs.get("failed", [])) and entry["digest"] == attrs.get("digest", {})
            and entry.get("block") == attrs.get("block") and entry.get("binding") == attrs.get("binding"))


def parse_index(raw: bytes, *, where: str, array_paths: set[str]) -> dict[str, dict]:
    """The entries of a stored index, validated field by field; StoreError (one line) otherwise."""
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{where}: not JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT or not isinstance(d.get("shards"), dict):
        raise StoreError(f"{where}: not a kdcache shard index of format {INDEX_FORMAT}")
    out = {}
    for name, e in d["shards"].items():
        check_name(name, where, "shard")
        at = f"{where}: shard {name}"
        if not isinstance(e, dict) or not {"count", "failures", "digest", "nbytes"} <= set(e) <= {
                "count", "failures", "digest", "nbytes", "block", "checksums", "failed", "binding"}:
            raise StoreError(f"{at}: expected an object with count, failures, digest, nbytes (and block, checksums, "
                             f"failed, binding)")
        for key in ("checksums", "failed", "binding"):
            if key in e and not (isinstance(e[key], str) and HEX64.match(e[key])):
                raise StoreError(f"{at}: {key} is not a sha256 hex digest")
        for key in ("count", "failures", "block"):
            v = e.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 40 or (key == "block" and v < 1):
                raise StoreError(f"{at}: {key} is {v!r}, expected a non-negative integer")
        for key in ("digest", "nbytes"):
            if not isinstance(e[key], dict) or not set(e[key]) <= array_paths:
                raise StoreError(f"{at}: {key} names arrays this store does not have")
        if not all(isinstance(h, str) and len(h) == 64 for h in e["digest"].values()):
            raise StoreError(f"{at}: digest values are not sha256 hex digests")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in e["nbytes"].values()):
            raise StoreError(f"{at}: nbytes values are not byte counts")
        out[name] = e
    return out


def index_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def render_index(entries: dict[str, dict]) -> bytes:
    return json.dumps({"format": INDEX_FORMAT, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "shards": {n: entries[n] for n in sorted(entries)}}, separators=(",", ":")).encode()


@contextlib.contextmanager
def index_lease(store, *, wait: float = 30.0):
    """Hold the index lease (so two jobs ending together do not drop each other's entries); after
    ``wait`` seconds without it, go ahead anyway: a lost entry only makes readers ask that shard."""
    leases = store.leases(new_owner(), seconds=60.0)
    deadline = time.monotonic() + wait
    while leases.acquire(INDEX_LEASE) is not None:
        if time.monotonic() > deadline:
            log.warning("%s: the shard index lease is held by another job; writing the index without it", store.url)
            yield
            return
        time.sleep(0.2)
    try:
        yield
    finally:
        leases.release(INDEX_LEASE)


def merge_entries(store, entries: dict[str, dict]) -> None:
    """Add (or replace) these entries in the stored index: what a job that completed shards
    does when it ends."""
    if not entries:
        return
    with index_lease(store):
        store.write_index({**(store.stored_index(warn=False) or {}), **entries})


