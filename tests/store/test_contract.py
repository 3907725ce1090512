"""The store's verbs, one suite run against every backend (zarr's StoreTests idea): a local
directory, memory://, and S3 on a loopback server."""
from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest

from kdcache.errors import CorruptShardError
from kdcache.store import Codebooks, Store, StoreError, StoreMeta, TeacherMeta, ViewPolicy

from kdcache.store.checks import block_crcs
from kdcache.store.verify import verify
from kdcache.store.codes import PRODUCT

K, D, GRID = 2, 8, (2, 2)


def _meta(dtype="float16") -> StoreMeta:
    t = TeacherMeta(model="m", weights_sha256="0" * 64, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                    interpolation="bicubic", crop_pct=0.9, patch_size=(16, 16), grid=GRID, dim=D, tokens=4,
                    prefix_tokens=1, summary="cls", dtype=dtype, codec="lz4")
    return StoreMeta(view_policy=ViewPolicy(views=K), teachers={"t": t}, corpus={"spec": "x", "fingerprint": "f"},
                     created_by="test")


def _rows(n, start=0, dtype=np.float16):
    rng = np.random.default_rng(start)
    origin = np.array([(1000 * (start + i), 100 + i, i, i % 3 - 1) for i in range(n)], dtype=np.int64).reshape(-1, 4)
    return {"keys": np.asarray([f"k{start + i}" for i in range(n)]), "views": rng.random((n, K, 5)).astype(np.float32),
            "origin": origin, "t/cls": rng.standard_normal((n, K, D)).astype(dtype),
            "t/patch": rng.standard_normal((n, K, 4, D)).astype(dtype)}


class StoreContract:
    """Subclasses give ``url``: a fresh location on their backend."""

    @pytest.fixture
    def url(self):
        pytest.fail("each backend subclass provides the url fixture")

    def _shard(self, store, name, n=5, start=0):
        w = store.new_shard(name, store.meta.teachers)
        rows = _rows(n, start)
        if not store.meta.records_origin:  # (format 1 and 2 stores do not record the images' places)
            rows.pop("origin")
        w.append(rows)
        w.add_failed("bad", "not an image")
        w.finish()
        return rows

    def test_create_open_round_trip_and_is_a_store(self, url):
        assert not Store.exists(url)
        Store.create(url, _meta())
        s = Store.open(url)
        assert Store.exists(url) and s.meta == _meta() and not s.writable
        with pytest.raises(StoreError, match="opened read-only"):
            s.new_shard("x", s.meta.teachers)

    def test_shards_become_complete_last_and_read_back(self, url):
        s = Store.create(url, _meta())
        rows = self._shard(s, "a")
        w = s.new_shard("b", s.meta.teachers)
        w.append(_rows(2, 10))  # never finished: a crashed writer
        assert s.shard_names() == ["a", "b"] and s.complete_shards() == ["a"] and not s.is_complete("b")
        np.testing.assert_array_equal(s.keys("a"), rows["keys"])
        np.testing.assert_array_equal(s.views("a"), rows["views"])
        np.testing.assert_array_equal(s.origin("a"), rows["origin"])
        assert s.shard_attrs("a")["block"] == s.block_rows("a", "t/patch") == s.shard_block("a")
        np.testing.assert_array_equal(s.read_features("a", "t", "patch"), rows["t/patch"].astype(np.float32))
        assert s.shard_attrs("a")["failed"] == [{"key": "bad", "error": "not an image"}] and s.shard_attrs("a")["count"] == 5
        assert s.block_rows("a", "t/patch") >= 5 and sum(s.array_nbytes("a").values()) > 0
        assert verify(Store.open(url)).problems == []
        s.delete_shard("b")
        assert s.shard_names() == ["a"]

    def test_the_auto_codec_compresses_what_lz4_shrinks_and_stores_the_rest_as_it_is(self, url):
        """``--codec auto`` (the default): per array, from its first block. Dense features (random
        normal, as transformer features are to lz4) filling whole inner chunks are stored without
        Blosc, rows that lz4 shrinks (post-ReLU: half zeros) with it; a shard smaller than its
        inner chunk, which zarr stores at full size uncompressed, with lz4 (the padding counts);
        all read back as written, plain zarr and the store alike; an array that got no rows (an
        empty shard) exists, uncompressed."""
        s = Store.create(url, _meta().replace(teachers={"t": dataclasses.replace(_meta().teachers["t"], codec="auto")}))
        full = s.new_shard("full", s.meta.teachers)
        block = full.block
        written = {}
        for name, n in (("full", block), ("small", 5)):
            rows = _rows(n)
            rows["t/cls"] = np.maximum(rows["t/cls"], 0)  # half zeros
            w = full if name == "full" else s.new_shard(name, s.meta.teachers)
            w.append(rows)
            w.finish()
            written[name] = rows
        s.new_shard("empty", s.meta.teachers).finish()

        def blosc(shard, path):
            inner = s.array(shard, path).metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
            return [c["configuration"]["cname"] for c in inner if c["name"] == "blosc"]
        assert blosc("full", "t/patch") == [] and blosc("full", "t/cls") == ["lz4"]
        assert blosc("small", "t/patch") == ["lz4"]  # 5 rows of a chunk of many: the padding would be most of it
        assert blosc("empty", "t/patch") == [] and s.array("empty", "t/patch").shape[0] == 0
        for name, rows in written.items():
            for path in ("t/patch", "t/cls"):
                np.testing.assert_array_equal(np.asarray(s.root[f"shards/{name}/{path}"][:]), rows[path])
                np.testing.assert_array_equal(s.read_features(name, "t", path[2:]), rows[path].astype(np.float32))
        assert verify(Store.open(url)).problems == []

    def test_adding_a_teacher_to_a_complete_shard(self, url):
        s = Store.create(url, _meta())
        self._shard(s, "a")
        t2 = {"u": s.meta.teachers["t"]}
        s.write_meta(s.meta.replace(teachers={**s.meta.teachers, **t2}))
        assert not s.is_complete("a", ["u"])
        w = s.extend_shard("a", t2)
        w.append({"u/cls": _rows(5)["t/cls"], "u/patch": _rows(5)["t/patch"]})
        w.finish()
        assert s.is_complete("a", ["t", "u"]) and verify(Store.open(url)).problems == []

    def test_derived_array_switches_atomically_and_reruns_clean_up(self, url):
        s = Store.create(url, _meta())
        rows = self._shard(s, "a")
        args = dict(row_shape=(K, 4, 1), dtype="uint8", codec="lz4",
                    transform=lambda r: (np.asarray(r, np.float32)[..., :1] > 0).astype(np.uint8))
        assert s.derive_array("a", "t/patch", "t/patch_codes", **args)
        digest = s.shard_attrs("a")["digest"]
        assert "t/patch_codes" in digest and "t/patch" not in digest
        np.testing.assert_array_equal(s.array("a", "t/patch_codes")[:], (rows["t/patch"][..., :1] > 0).astype(np.uint8))
        with pytest.raises(StoreError, match="no array 't/patch'"):
            s.array("a", "t/patch")
        assert not s.derive_array("a", "t/patch", "t/patch_codes", **args)  # a rerun: nothing to do
        codes = s.array("a", "t/patch_codes")  # laid out as the writer lays out a format-2 store: a Zarr shard per view
        assert codes.shards[1] == 1 and len(s.shard_attrs("a")["block_crc32"]["t/patch_codes"]) == K  # one block
        np.testing.assert_array_equal(next(s.read_blocks("a", "t/patch_codes", view=1)),
                                      (rows["t/patch"][:, 1, ..., :1] > 0).astype(np.uint8))

    def test_a_format_1_store_reads_and_grows_in_format_1(self, url):
        """A store written before per-view Zarr shards (format 1) is read as it is, and what is added
        to it keeps its layout (the kdcache that wrote it reads it still)."""
        s = Store.create(url, _meta().replace(format=1))
        rows = self._shard(s, "a")
        s = Store.open(url)
        assert s.meta.format == 1 and s.array("a", "t/patch").shards[1] == K
        assert len(s.shard_attrs("a")["block_crc32"]["t/patch"]) == 1  # one CRC-32 per block, every view in it
        np.testing.assert_array_equal(next(s.read_blocks("a", "t/patch", view=1)), rows["t/patch"][:, 1])
        np.testing.assert_array_equal(s.read_features("a", "t", "cls"), rows["t/cls"].astype(np.float32))
        s = Store.open(url, writable=True)
        s.derive_array("a", "t/patch", "t/patch_codes", row_shape=(K, 4, 1), dtype="uint8", codec="lz4",
                       transform=lambda r: (np.asarray(r, np.float32)[..., :1] > 0).astype(np.uint8))
        assert s.array("a", "t/patch_codes").shards[1] == K and verify(Store.open(url)).problems == []

    def test_each_view_of_a_block_is_checked_alone_and_needs_its_checksums(self, url):
        """Format 2: a damaged view's Zarr shard fails that view's read, naming block and view; the
        other view reads; a per-view array whose checksums were removed is refused, not read
        unchecked."""
        s = Store.create(url, _meta())
        rows = self._shard(s, "a")
        key = "shards/a/t/patch/c/0/1/0/0"
        raw = bytearray(s.objects.get(key, limit=1 << 24).tobytes())
        raw[len(raw) // 3] ^= 0x40  # view 1's Zarr shard of block 0
        s.objects.put(key, bytes(raw))
        s = Store.open(url)
        np.testing.assert_array_equal(s.read_block("a", "t/patch", 0, view=0), rows["t/patch"][:, 0])
        with pytest.raises(CorruptShardError, match=r"shard a: t/patch: block 0 view 1 (does not match|unreadable)"):
            s.read_block("a", "t/patch", 0, view=1)
        attrs = dict(s.shard_attrs("a"))
        del attrs["block_crc32"]
        Store.open(url, writable=True).root["shards/a"].attrs.put(attrs)
        with pytest.raises(CorruptShardError, match=r"shard a: its record does not hash to its binding"):
            Store.open(url).read_block("a", "t/cls", 0, view=0)  # the checksums removed: the record is not the one bound
        from kdcache.store.layout import sealed
        Store.open(url, writable=True).root["shards/a"].attrs.put(sealed("a", attrs))  # bound again, as a writer would
        with pytest.raises(CorruptShardError, match=r"t/cls: no block checksums, though each view is a Zarr shard"):
            Store.open(url).read_block("a", "t/cls", 0, view=0)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_a_block_holding_a_non_finite_value_is_refused_though_its_checksum_matches(self, url, bad):
        """Tampered, not damaged: a value replaced by NaN or infinity and the block's CRC-32 recomputed
        to match (it is no secret) is still refused, naming shard, array and block."""
        s = Store.create(url, _meta())
        rows = self._shard(s, "a")
        patch = rows["t/patch"].copy()
        patch[-1, 0, -1, -1] = bad  # the block's last value
        w = Store.open(url, writable=True)
        w.root["shards/a/t/patch"][:] = patch
        attrs = dict(w.shard_attrs("a"))
        attrs["block_crc32"] = {**attrs["block_crc32"], "t/patch": block_crcs(patch, per_view=True)}
        from kdcache.store.layout import sealed
        w.root["shards/a"].attrs.put(sealed("a", attrs))  # the binding recomputed too: a forger's whole job
        s = Store.open(url)
        np.testing.assert_array_equal(s.read_block("a", "t/patch", 0, view=1), rows["t/patch"][:, 1])  # its other view
        with pytest.raises(CorruptShardError, match=r"shard a: t/patch: block 0 view 0 holds NaN or infinite values"):
            s.read_block("a", "t/patch", 0, view=0)

    @pytest.mark.parametrize("fmt", [0, 5, True, "2"])
    def test_a_format_this_kdcache_does_not_read_is_one_line(self, url, fmt):
        s = Store.create(url, _meta())
        s.root.attrs["kdcache"] = {**s.root.attrs["kdcache"], "format": fmt}
        with pytest.raises(StoreError, match=r"store format .* is not supported \(this kdcache reads formats 1, 2, 3, 4\)"):
            Store.open(url)

    def test_codebooks_and_stats(self, url):
        s = Store.create(url, _meta())
        assert s.read_codebooks("t", "patch") is None and s.read_stats("t", "patch") is None
        cb = Codebooks("pq", PRODUCT, np.zeros(D, np.float32), np.eye(D, dtype=np.float32),
                       np.arange(2 * 256 * 4, dtype=np.float32).reshape(2, 256, 4), {"spec": "pq:M=2"})
        s.write_codebooks("t", "patch", cb)
        got = Store.open(url).read_codebooks("t", "patch")
        np.testing.assert_array_equal(got.codebooks, cb.codebooks)
        assert got.attrs["spec"] == "pq:M=2" and got.m == 2
        s.write_stats("t", "cls", mean=np.ones(D), covariance=np.eye(D), count=7, attrs={"sampled_from": {}})
        st = Store.open(url).read_stats("t", "cls")
        assert st["count"] == 7 and st["mean"].dtype == np.float64
        np.testing.assert_array_equal(st["covariance"], np.eye(D))

    def test_bfloat16_is_stored_as_bits_and_read_as_float(self, url):
        s = Store.create(url, _meta("bfloat16"))
        x = np.random.default_rng(0).standard_normal((3, K, 4, D)).astype(np.float32)
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16
        w = s.new_shard("a", s.meta.teachers)
        w.append({"keys": np.asarray(["a", "b", "c"]), "views": np.zeros((3, K, 5), np.float32),
                  "t/cls": bits[:, :, 0], "t/patch": bits})
        w.finish()
        assert s.array("a", "t/patch").dtype == np.uint16
        np.testing.assert_array_equal(s.read_features("a", "t", "patch"), (bits.astype(np.uint32) << 16).view(np.float32))


    def test_leases_are_exclusive_renewable_and_expire(self, url):
        s = Store.create(url, _meta())
        a, b = s.leases("owner-a"), s.leases("owner-b")
        b.pid = a.pid + 1_000_000  # another process that is alive as far as a local check goes
        assert a.acquire("x") is None and b.acquire("x").owner == "owner-a"
        assert a.renew("x") and not b.renew("x") and set(a.all()) == {"x"}
        b.release("x")  # not b's to release
        assert b.acquire("x").owner == "owner-a"
        a.release("x")
        assert b.acquire("x") is None and b.holder("x").owner == "owner-b"
        expired = s.leases("owner-c", seconds=-1.0)  # written already expired: no waiting on a clock
        assert expired.acquire("y") is None
        assert a.acquire("y") is None and a.holder("y").owner == "owner-a"  # an expired lease is broken


    def test_a_lease_under_our_own_pid_is_a_dead_job_whose_pid_we_inherited(self, url):
        s = Store.create(url, _meta())
        assert s.leases("killed-job").acquire("x") is None
        assert s.leases("resumed-job").acquire("x") is None  # same host and pid, another owner: stale
        assert s.leases("resumed-job").holder("x").owner == "resumed-job"


class TestLocalStore(StoreContract):
    @pytest.fixture
    def url(self, tmp_path):
        return str(tmp_path / "s.zarr")


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def url(self):
        return f"memory://kdcache-test-{uuid.uuid4().hex}"


class TestS3Store(StoreContract):
    """The same contract on an S3-compatible server on loopback (moto), through s3fs."""

    @pytest.fixture
    def url(self, s3):
        return f"s3://{s3.bucket()}/s.zarr"


def test_a_plain_directory_is_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    assert not Store.exists(str(tmp_path / "x"))
    with pytest.raises(StoreError, match="no kdcache store here"):
        Store.open(str(tmp_path / "x"))
