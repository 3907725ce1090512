"""``kdcache verify``: every complete shard against its digests and shapes, optionally the corpus.

The one place a store is verified. The corpus side comes in as plain iterables of keys (what
each corpus shard should hold, computed by ``kdcache.data.corpus_keys`` through the one walk),
so ``store/`` stays free of corpus code, and verifying the store alone imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from kdcache.errors import StoreError, one_line

from .layout import ArrayDigest, digest_array
from .meta import (LOGIT_ARRAYS, ORIGIN, ORIGIN_COLUMNS, PIXEL_SPANS, PIXELS_JPEG, PIXELS_RAW, TOKEN_KINDS, dense_path,
                   feature_path, has_pixels, has_teacher, logits_path, teacher_arrays)
from .shard_index import INDEX_KEY, agrees
from .store import Store


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    shards_incomplete: int = 0
    samples: int = 0

    def line(self) -> str:
        return (f"checked {self.shards_checked} complete shard(s), {self.samples} samples; "
                f"{self.shards_incomplete} incomplete; {len(self.problems)} problem(s)")

    def to_dict(self) -> dict:
        return {"problems": self.problems, "shards_checked": self.shards_checked,
                "shards_incomplete": self.shards_incomplete, "samples": self.samples}


def verify(store: Store, corpus_keys: Mapping[str, Iterable] | None = None, *, progress: bool = False,
           data: bool = True, pin: str | None = None) -> VerifyReport:
    """Every shard through the checks every reader makes (``verify_shard``; ``data`` off: metadata
    and shapes only, no array read); the shard index against the shards; with ``corpus_keys``
    (corpus shard name -> its stored samples as ``(key, CRC-32 of the image bytes)`` pairs,
    lazily), that the stored keys equal them in order, that each image's bytes are those
    extracted (where the store records their CRC-32), and that store and corpus hold the same
    shards."""
    from tqdm import tqdm
    report = VerifyReport()
    complete = []
    for name in store.shard_names():
        try:
            (complete.append(name) if store.is_complete(name) else None)
        except StoreError as e:  # metadata a reader refuses (unparseable, out of range, a broken binding)
            report.problems.append(_finding(store, name, e))
    report.shards_checked = len(complete)
    report.shards_incomplete = len(store.shard_names()) - len(complete) - len(report.problems)
    for name in tqdm(complete, unit="shard", desc="verify digests" if data else "verify metadata", disable=not progress,
                     dynamic_ncols=True):
        report.samples += int((store.shard_attrs(name) or {}).get("count", 0))
        report.problems += verify_shard(store, name, data=data)
    report.problems += index_problems(store, complete)
    if pin is not None:
        report.problems += pin_problems(store, complete, pin)
    if corpus_keys is not None:
        report.problems += [f"shard {n}: in the store but not in the corpus" for n in complete if n not in corpus_keys]
        for name, samples in tqdm(corpus_keys.items(), unit="shard", desc="verify against the corpus",
                                  disable=not progress, dynamic_ncols=True):
            if name not in complete:
                report.problems.append(f"shard {name}: in the corpus but not complete in the store")
            else:
                report.problems += _corpus_problems(store, name, samples)
    return report


def verify_store(url: str, corpus_keys: Mapping[str, Iterable[str]] | None = None, *, progress: bool = False,
                 data: bool = True, pin: str | None = None) -> VerifyReport:
    """``kdcache verify URL``: open the store read-only and verify it (verify never writes; it
    reads every shard's own metadata, never the shard index's word for it)."""
    return verify(Store.open(url, index=False), corpus_keys, progress=progress, data=data, pin=pin)


def pin_problems(store: Store, complete: list[str], pin: str) -> list[str]:
    """The store against the digest a team pinned (``kdcache info``'s ``pin``: the sha256 of the
    shard index, which the root metadata records): that index, unchanged, lists exactly the
    complete shards, each with the binding its own record hashes to. Together with the checks of
    every shard (data -> digests -> binding) the whole store is the one pinned."""
    from .shard_index import INDEX_ATTR
    named = (store.root.attrs.get(INDEX_ATTR) or {}).get("sha256")
    if named != pin:
        return [f"--pin {pin[:16]}...: the store's root names index {str(named)[:16]}..., another version of the store"]
    entries = store.stored_index(warn=False)
    if entries is None:
        return [f"--pin: the shard index is missing or does not hash to {pin[:16]}... (changed since it was pinned)"]
    problems = [f"--pin: shard {n} is complete but not in the pinned index (added since)" for n in complete
                if n not in entries]
    problems += [f"--pin: shard {n} of the pinned index is not complete in the store (removed since)" for n in entries
                 if n not in complete]
    for n in complete:
        if n in entries and entries[n].get("binding") != (store.shard_attrs(n) or {}).get("binding"):
            problems.append(f"--pin: shard {n}: its binding is not the pinned index's (the shard changed since)")
    return problems


def index_problems(store: Store, complete: list[str]) -> list[str]:
    """The shard index against the shards: an index that does not parse, or an entry that says
    other than its shard (stale or tampered: readers would warn and read the shard). A complete
    shard the index lacks is no problem (readers ask it themselves)."""
    import logging
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            problems.append(f"{INDEX_KEY}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("kdcache.store")
    logger.addHandler(handler)
    try:
        entries = store.stored_index()
    finally:
        logger.removeHandler(handler)
    if entries is None:
        return problems
    done = set(complete)
    for name, entry in sorted(entries.items()):
        if name not in done and name not in store.shard_names():
            continue  # a shard deleted since: readers never see it (the listing decides)
        try:
            attrs = store.shard_attrs(name)
        except StoreError:  # the shard's own metadata is refused: reported for the shard itself
            continue
        if not agrees(entry, attrs):
            problems.append(f"{INDEX_KEY}: the entry for shard {name} disagrees with the shard's own metadata (stale or "
                            f"tampered; readers ignore it with a warning; kdcache store stats rewrites the index)")
    return problems


def _corpus_problems(store: Store, name: str, samples: Iterable) -> list[str]:
    """The corpus shard's samples (``(key, CRC-32)`` pairs) against the store shard's keys, and each
    image's bytes against the CRC-32 extraction recorded (``origin``, format 3 and later)."""
    try:
        stored = store.keys(name).tolist()
        origin = store.origin(name)
    except StoreError as e:  # a damaged keys or origin array is a finding, found once by verify_shard too
        return [f"shard {name}: keys or origin unreadable, the corpus cannot be compared ({one_line(e)})"]
    i, changed = 0, []
    try:
        for key, crc in samples:
            if i >= len(stored):
                return [f"shard {name}: {len(stored)} keys in the store, the corpus has more (next {key!r})"]
            if key != stored[i]:
                return [f"shard {name}: key {i} is {stored[i]!r} in the store but {key!r} in the corpus"]
            if origin is not None and origin[i, 2] >= 0 and crc != origin[i, 2]:
                changed.append(key)
            i += 1
    except Exception as e:  # noqa: BLE001 - an unreadable corpus shard is a finding, not a crash
        return [f"shard {name}: corpus unreadable after {i} keys: {e}"]
    if i != len(stored):
        return [f"shard {name}: {len(stored)} keys in the store, {i} in the corpus"]
    if changed:
        return [f"shard {name}: {len(changed)} image(s) are not the bytes extracted (CRC-32 differs; first: "
                f"{changed[0]!r}): replaced or damaged since, their targets are another picture's"]
    return []


def verify_shard(store: Store, name: str, *, data: bool = True) -> list[str]:
    """Problems found in one complete shard (empty when intact): the checks every reader makes, on
    every array. The record: its binding (``Store.shard_attrs``), a digest entry for every array
    the store's metadata declares for what the shard holds and for every array it holds, block
    checksums for every array but the keys (format 2 and later); the shapes; with ``data``, every
    block through ``read_block`` (its CRC-32, finiteness), the keys, views and origin through their
    readers (digests, ranges), the JPEG runs through ``read_pixels`` (spans, CRC-32), and every
    array's sha256 over the blocks read. ``data`` off: record and shapes only."""
    where = f"shard {name}"
    try:
        attrs = store.shard_attrs(name) or {}
    except StoreError as e:
        return [_finding(store, name, e)]
    digest, count, k = attrs.get("digest", {}), attrs.get("count"), store.meta.views
    crcs = attrs.get("block_crc32")
    problems = []
    expected = {"keys": (count,), "views": (count, k, 5)}
    if store.meta.records_origin:
        expected[ORIGIN] = (count, len(ORIGIN_COLUMNS))
    for t, m in store.meta.teachers.items():
        if not has_teacher(digest, t):
            problems.append(f"{where}: teacher {t} missing (no digest entry)")
            continue
        shapes = teacher_arrays(t, m, k)
        for kind in (*TOKEN_KINDS, *(["dense"] if m.dense else [])):  # the floats or the codes (or both)
            paths = ((dense_path(t), dense_path(t, codes=True)) if kind == "dense"
                     else (feature_path(t, kind), feature_path(t, kind, codes=True)))
            held = [p for p in paths if p in digest] or [paths[0]]
            expected.update({p: (count, *shapes[p][0]) if p in shapes else None for p in held})
        if m.logits:
            expected.update({logits_path(t, part): (count, *shapes[logits_path(t, part)][0]) for part in LOGIT_ARRAYS})
    if has_pixels(digest):
        expected[PIXEL_SPANS] = None
        expected[PIXELS_RAW if PIXELS_RAW in digest else PIXELS_JPEG] = None
    for path in expected:
        if path not in digest:
            problems.append(f"{where}: {path}: no digest entry (removed: the array cannot be checked, readers refuse it)")
    for path in sorted(_stored_arrays(store, name) - set(digest)):
        problems.append(f"{where}: {path}: an array the digest does not list (left by an edit, or its entry removed)")
    if crcs is None and store.meta.view_shards:
        problems.append(f"{where}: no block checksums (store format {store.meta.format} writes them for every array)")
    elif crcs is not None:
        problems += [f"{where}: {p}: no block checksums (removed: readers refuse the array)"
                     for p in digest if p != "keys" and p not in crcs]
    if problems:
        return problems
    expected.update({p: None for p in digest if p not in expected})
    for path, shape in expected.items():
        try:
            arr = store.array(name, path)
        except Exception as e:  # noqa: BLE001 - any read failure is a finding
            problems.append(f"{where}: {path}: unreadable ({one_line(e)})")
            continue
        if shape is not None and tuple(arr.shape) != shape:
            problems.append(f"{where}: {path}: shape {tuple(arr.shape)}, expected {shape}")
            continue
        if data:
            problems += _array_problems(store, name, path, arr, attrs)
    return problems


def _finding(store: Store, name: str, e: Exception) -> str:
    """A reader's refusal as a finding: ``shard NAME: what`` (the store's URL left out)."""
    text = one_line(e).removeprefix(f"{store.url}: ")
    return text if text.startswith(f"shard {name}") else f"shard {name}: {text}"


def _stored_arrays(store: Store, name: str) -> set[str]:
    try:
        group = store.root[f"shards/{name}"]
        return {p for p, a in group.members(max_depth=None) if hasattr(a, "shape")}
    except Exception:  # noqa: BLE001 - an unlistable group: its arrays are found unreadable one by one
        return set()


def _array_problems(store: Store, name: str, path: str, arr, attrs: dict) -> list[str]:
    """One array read as the readers read it, and its sha256 over the rows read."""
    where = f"shard {name}: {path}"
    try:
        if path in ("keys", "views", ORIGIN):  # their readers check the digest, and ranges
            (store.keys if path == "keys" else store.views if path == "views" else store.origin)(name)
            return []
        if path == PIXELS_JPEG:
            spans = store.array(name, PIXEL_SPANS)
            block = store.block_rows(name, PIXEL_SPANS, array=spans)
            for start in range(0, spans.shape[0], block):
                for v in range(spans.shape[1]):
                    store.read_pixels(name, start, min(spans.shape[0], start + block), view=v, attrs=attrs)
            got = digest_array(arr)
        else:
            d = ArrayDigest()
            for b in range(-(-arr.shape[0] // store.block_rows(name, path, array=arr))):
                d.update(store.read_block(name, path, b, attrs=attrs, array=arr))
            got = d.hexdigest()
    except StoreError as e:  # what a reader would refuse: unreadable, checksum, non-finite, spans
        return [f"{where}: {one_line(e).split(f'{name}: {path}: ', 1)[-1]}"]
    except Exception as e:  # noqa: BLE001
        return [f"{where}: cannot read data ({type(e).__name__}: {e})"]
    want = (attrs.get("digest") or {}).get(path)
    if got != want:
        return [f"{where}: digest mismatch (stored {str(want)[:12]}, data {got[:12]})"]
    return []
