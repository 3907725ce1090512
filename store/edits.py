"""Changes to complete shards: arrays derived from others (quantization), arrays dropped.

A mixin of ``Store``. Each change keeps a shard's promise that what its digest lists is what it
holds: new data is written in full first, then one atomic attribute update switches the digest
(and checksums), then what is no longer listed is deleted; a rerun only cleans up.
"""
from __future__ import annotations

import numpy as np

from kdcache.errors import StoreError

from .layout import ArrayDigest, append_rows, create_rows_array, sealed
from .meta import SHARDS, per_view_shards, quantizer_path, stats_path
from .checks import block_crcs


class ShardEdits:
    def derive_array(self, shard: str, src: str, dst: str, *, transform, row_shape: tuple, dtype: str, codec: str,
                     attrs: dict | None = None, keep_source: bool = False) -> bool:
        """Add array ``dst`` = ``transform(rows of src)`` to complete shard ``shard``, block by block.

        Crash-safe: ``dst`` is written in full, then one atomic attribute update adds it to the
        digest (and drops ``src`` from it unless ``keep_source``), then ``src`` is deleted. A
        rerun finds ``dst`` in the digest and only cleans up. Returns False if it was there."""
        self._need_writable()
        group = self.root[f"{SHARDS}/{shard}"]
        attrs_now = dict(group.attrs)
        digest = dict(attrs_now.get("digest", {}))
        if dst in digest:
            self._drop_unlisted(group, digest, src)
            return False
        if src not in digest:
            raise StoreError(f"{self.url}: shard {shard} has neither {src} nor {dst}")
        if dst in group:
            del group[dst]  # left by an interrupted run
        block = self.block_rows(shard, src)
        per_view = per_view_shards(dst, views=self.meta.views, view_shards=self.meta.view_shards)
        h, crcs, out = ArrayDigest(), [], None
        for source_rows in self.read_blocks(shard, src):
            rows = np.asarray(transform(source_rows), dtype=dtype)
            h.update(rows)
            crcs += block_crcs(rows, per_view=per_view)
            if out is None:  # (created with the first block: an ``auto`` codec is chosen from it)
                out = create_rows_array(group, dst, row_shape, dtype, block=block, codec=codec, attrs=attrs,
                                        per_view=per_view, first_rows=rows)
            append_rows(out, rows)
        if out is None:
            create_rows_array(group, dst, row_shape, dtype, block=block, codec=codec, attrs=attrs, per_view=per_view)
        digest[dst] = h.hexdigest()
        if not keep_source:
            digest.pop(src)
        new_attrs = {**attrs_now, "digest": digest}
        if "block_crc32" in attrs_now:
            new_attrs["block_crc32"] = {**{p: c for p, c in attrs_now["block_crc32"].items() if p in digest}, dst: crcs}
        group.attrs.put(_resealed(shard, new_attrs))  # the switch: one atomic metadata write
        self._drop_unlisted(group, digest, src)
        return True

    def drop_arrays(self, shard: str, paths: set[str]) -> bool:
        """Remove arrays from a shard: its digest and checksums first (one atomic write), then the
        arrays. Returns whether the shard held any of them."""
        self._need_writable()
        group = self.root[f"{SHARDS}/{shard}"]
        attrs = dict(group.attrs)
        present = [p for p in paths if p in group or p in attrs.get("digest", {})]
        if not present:
            return False
        attrs["digest"] = {p: d for p, d in attrs.get("digest", {}).items() if p not in paths}
        if "block_crc32" in attrs:
            attrs["block_crc32"] = {p: c for p, c in attrs["block_crc32"].items() if p not in paths}
        group.attrs.put(_resealed(shard, attrs))
        for p in present:
            if p in group:
                del group[p]
        teacher = {p.split("/", 1)[0] for p in present}
        for t in teacher:  # the teacher's now empty group
            if t in group and not list(group[t].array_keys()):
                del group[t]
        return True

    def drop_teacher_groups(self, teacher: str) -> None:
        """A teacher's quantizers and statistics."""
        self._need_writable()
        for path in (quantizer_path(teacher, "x").rsplit("/", 1)[0], stats_path(teacher, "x").rsplit("/", 1)[0]):
            if path in self.root:
                del self.root[path]

    @staticmethod
    def _drop_unlisted(group, digest, path):
        if path not in digest and path in group:
            del group[path]


def _resealed(shard: str, attrs: dict) -> dict:
    """A complete shard's changed record bound again (``layout.shard_binding``): the edit was made
    from verified rows, so the new binding vouches for what the old one did."""
    return sealed(shard, attrs) if attrs.get("complete") is True else attrs
