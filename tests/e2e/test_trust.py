"""Trust, second pass: each case a hostile user (or a confused sync tool) tried, refused in one line,
found by verify, warned about, or counted correctly, through the real command line on copies of a
valid store. Every case here passed unnoticed before shards were bound to their names, verify ran
the readers' checks, and the corpus was checked by content."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import zarr
from helpers import cli_call, one_error_line

from kdcache.store.layout import sealed

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"
A, B = "demo-000000", "demo-000001"


@pytest.fixture
def store(tmp_path, vit_store):
    out = str(tmp_path / "s.zarr")
    shutil.copytree(vit_store, out)
    return out


def _attrs(store, shard):
    return zarr.open_group(store, mode="r")[f"shards/{shard}"].attrs.asdict()


def _put_attrs(store, shard, attrs):
    zarr.open_group(store, mode="r+")[f"shards/{shard}"].attrs.put(attrs)


def _run(monkeypatch, capsys, *args):
    return cli_call(monkeypatch, capsys, *args)


def _train(monkeypatch, capsys, store, corpus, out, *extra):
    return _run(monkeypatch, capsys, "train", "--store", store, "--data", corpus, "--student", STUDENT, "--out", str(out),
                "--epochs", "1", "--batch-size", "4", "--workers", "0", "--head-hidden", "16", "--no-progress", *extra)


@pytest.mark.parametrize("resealed", [False, True])
def test_an_array_whose_digest_and_checksums_were_removed_is_refused_by_verify_copy_and_subset(
        tmp_path, store, corpus, monkeypatch, capsys, resealed):
    """Its entries deleted and a byte flipped: the record no longer hashes to its binding; and if a
    forger bound it again, verify still finds an array its digest does not list. Neither copies."""
    attrs = _attrs(store, B)
    del attrs["digest"]["vit/patch"], attrs["block_crc32"]["vit/patch"]
    _put_attrs(store, B, sealed(B, attrs) if resealed else attrs)
    chunk = next(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(store, "shards", B, "vit", "patch", "c"))
                 for f in fs)
    raw = bytearray(open(chunk, "rb").read())
    raw[len(raw) // 2] ^= 0x40
    open(chunk, "wb").write(bytes(raw))
    want = "an array the digest does not list" if resealed else "does not hash to its binding"
    for args in (["verify", store], ["verify", store, "--data", corpus]):
        code, out, _ = _run(monkeypatch, capsys, *args)
        assert code == 1 and f"MISMATCH shard {B}: " in out and want in out, out
    refused = "teacher vit missing" if resealed else want  # (without its patch digest the shard lacks the teacher)
    for args in (["store", "copy", store, str(tmp_path / "c.zarr")],
                 ["store", "subset", store, "--shards", "demo-00000[01]", "--out", str(tmp_path / "sub.zarr")]):
        code, _, err = _run(monkeypatch, capsys, *args, "--no-progress")
        line = one_error_line(err)
        assert code == 2 and f"shard {B}" in line and refused in line, err
    code, _, err = _train(monkeypatch, capsys, store, corpus, tmp_path / "run")
    assert code == 2 and f"shard {B}" in one_error_line(err)


def test_nan_written_with_every_checksum_and_the_binding_recomputed_is_found_by_verify(store, corpus, monkeypatch,
                                                                                        capsys):
    from kdcache.store.checks import block_crcs
    g = zarr.open_group(store, mode="r+")[f"shards/{B}"]
    cls = np.asarray(g["vit/cls"][:])
    cls[2, 1, 5] = np.nan
    g["vit/cls"][:] = cls
    from kdcache.store.layout import ArrayDigest
    d = ArrayDigest()
    d.update(cls)
    attrs = g.attrs.asdict()
    attrs["digest"]["vit/cls"] = d.hexdigest()
    attrs["block_crc32"]["vit/cls"] = block_crcs(cls, per_view=True)
    _put_attrs(store, B, sealed(B, attrs))  # everything a forger can recompute, recomputed
    code, out, _ = _run(monkeypatch, capsys, "verify", store)
    assert code == 1 and f"MISMATCH shard {B}: vit/cls: block 0 view 1 holds NaN or infinite values" in out, out


def test_swapped_and_duplicated_shards_fail_their_binding(tmp_path, store, corpus, monkeypatch, capsys):
    """The teacher arrays of two shards swapped with their digest and checksum entries (what a sync
    tool mixing up two directories does): each shard's record now names the other's data. A shard
    directory copied under another name: its record names the shard it was."""
    for path in ("vit",):
        a, b = (os.path.join(store, "shards", s, path) for s in (A, B))
        shutil.move(a, a + ".tmp"), shutil.move(b, a), shutil.move(a + ".tmp", b)
    ta, tb = _attrs(store, A), _attrs(store, B)
    for key in ("vit/cls", "vit/patch"):
        ta["digest"][key], tb["digest"][key] = tb["digest"][key], ta["digest"][key]
        ta["block_crc32"][key], tb["block_crc32"][key] = tb["block_crc32"][key], ta["block_crc32"][key]
    _put_attrs(store, A, ta), _put_attrs(store, B, tb)
    code, out, _ = _run(monkeypatch, capsys, "verify", store, "--data", corpus)
    assert code == 1 and all(f"MISMATCH shard {s}: its record does not hash to its binding" in out for s in (A, B)), out
    code, _, err = _train(monkeypatch, capsys, store, corpus, tmp_path / "run")
    assert code == 2 and "does not hash to its binding" in one_error_line(err)
    code, _, err = _run(monkeypatch, capsys, "eval", "knn", "--store", store)
    assert code == 2 and "does not hash to its binding" in one_error_line(err)
    dup = str(tmp_path / "dup.zarr")
    shutil.copytree(os.path.join(os.path.dirname(store), "s.zarr"), dup)
    shutil.rmtree(os.path.join(dup, "shards", A)), shutil.rmtree(os.path.join(dup, "shards", B))
    shutil.copytree(os.path.join(dup, "shards", "demo-000002"), os.path.join(dup, "shards", "demo-000009"))
    code, out, _ = _run(monkeypatch, capsys, "verify", dup)
    assert code == 1 and "MISMATCH shard demo-000009: its record does not hash to its binding" in out, out


def _rewrite_member(tar_path, key, data):
    """The corpus shard with ``key``'s image replaced by ``data`` (same name), every other member as it was."""
    members = []
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            members.append((m, t.extractfile(m).read()))
    with tarfile.open(tar_path, "w") as t:
        for m, content in members:
            if m.name.startswith(key + "."):
                content = data(content)
                m.size = len(content)
            t.addfile(m, io.BytesIO(content))


@pytest.mark.parametrize("change", ["replaced", "damaged"])
def test_an_image_replaced_or_damaged_under_its_name_is_found_by_its_content(tmp_path, store, corpus, monkeypatch, capsys,
                                                                             change):
    """Another picture under the same name, or the JPEG's bytes damaged: the keys still match, the
    CRC-32 of the bytes extracted does not. verify --data finds it; train refuses it naming shard
    and key, or with --skip-corrupt trains on the rest and records it."""
    data = str(tmp_path / "corpus")
    shutil.copytree(corpus, data)
    tar = os.path.join(data, f"{B}.tar")
    with tarfile.open(tar) as t:
        key = sorted(m.name for m in t.getmembers() if m.name.endswith((".jpg", ".png")))[2].rsplit(".", 1)[0]
        other = next(t.extractfile(m).read() for m in t.getmembers()
                     if m.name.endswith((".jpg", ".png")) and not m.name.startswith(key + "."))
    if change == "replaced":
        _rewrite_member(tar, key, lambda old: other)
    else:
        _rewrite_member(tar, key, lambda old: old[:len(old) // 2] + bytes(b ^ 0x55 for b in old[len(old) // 2:]))
    st = os.stat(os.path.join(corpus, f"{B}.tar"))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))  # (the corpus's fingerprint: same names, same times)
    code, out, _ = _run(monkeypatch, capsys, "verify", store, "--data", data)
    assert code == 1 and f"MISMATCH shard {B}: 1 image(s) are not the bytes extracted" in out and repr(key) in out, out
    code, _, err = _train(monkeypatch, capsys, store, data, tmp_path / "run")
    line = one_error_line(err)
    assert code == 2 and B in line and key in line and "not those extracted" in line, line
    code, out, err = _train(monkeypatch, capsys, store, data, tmp_path / "skip", "--skip-corrupt")
    assert code == 0 and json.loads(out)["skipped"]["shards"] == [B], err


def test_an_index_entry_edited_on_its_own_is_ignored_and_counts_stay_true(tmp_path, store, corpus, monkeypatch, capsys,
                                                                          caplog):
    """A lower count in the shard index, the root's digest of the index rewritten to match: the
    entry no longer hashes to its binding, so info and train answer from the shard itself (with a
    warning) and train takes every sample."""
    path = os.path.join(store, "shard_index.json")
    idx = json.load(open(path))
    idx["shards"][B]["count"] = 3
    raw = json.dumps(idx).encode()
    open(path, "wb").write(raw)
    g = zarr.open_group(store, mode="r+")
    g.attrs.put({**g.attrs.asdict(), "kdcache_shard_index": {"sha256": hashlib.sha256(raw).hexdigest(), "shards": 3}})
    import logging
    with caplog.at_level(logging.WARNING, logger="kdcache.store"):
        code, out, err = _run(monkeypatch, capsys, "info", store, "--json")
    assert code == 0 and json.loads(out)["samples"] == 24 and "do not hash to the binding they record" in caplog.text
    code, out, err = _train(monkeypatch, capsys, store, corpus, tmp_path / "run")
    assert code == 0 and json.loads(out)["steps"] == 24 // 4, err


def test_info_check_flags_a_shard_whose_metadata_is_garbage_and_skip_corrupt_counts_its_samples(
        tmp_path, store, corpus, monkeypatch, capsys):
    """The index describes the store until someone asks the shards (info --check); a run that skips
    the shard counts the samples it held, not 0."""
    meta = os.path.join(store, "shards", B, "zarr.json")
    open(meta, "w").write("{garbage")
    code, out, _ = _run(monkeypatch, capsys, "info", store)
    assert code == 0 and "described by the shard index alone" in out and "info --check" in out
    code, out, _ = _run(monkeypatch, capsys, "info", store, "--check")
    assert code == 0 and "1 whose own metadata every reader refuses" in out and B in out, out
    code, out, _ = _run(monkeypatch, capsys, "eval", "store", store)
    assert code == 0 and "complete shards from the shard index alone; `kdcache info --check`" in out, out
    os.remove(os.path.join(store, "shard_index.json"))  # planned from the shards: this one refused at plan time
    code, out, _ = _run(monkeypatch, capsys, "eval", "store", store)
    assert code == 0 and "1 shard(s) whose own metadata every reader refuses" in out, out
    code, out, err = _train(monkeypatch, capsys, store, corpus, tmp_path / "run", "--skip-corrupt")
    r = json.loads(out)
    assert code == 0 and r["skipped"]["shards"] == [B] and r["skipped"]["samples"] == 8, err


def test_verify_pin_holds_a_store_to_the_digest_it_was_trusted_at(tmp_path, store, monkeypatch, capsys):
    code, out, _ = _run(monkeypatch, capsys, "info", store, "--json")
    pin = json.loads(out)["root_digest"]
    assert code == 0 and len(pin) == 64
    code, out, _ = _run(monkeypatch, capsys, "verify", store, "--pin", pin)
    assert code == 0, out
    shutil.rmtree(os.path.join(store, "shards", B))  # a shard removed and the index rewritten: a new version
    assert _run(monkeypatch, capsys, "store", "stats", store)[0] == 0
    code, out, _ = _run(monkeypatch, capsys, "verify", store, "--pin", pin)
    assert code == 1 and "MISMATCH --pin" in out and "another version of the store" in out, out


def test_every_output_path_and_unreachable_endpoint_is_one_line(tmp_path, store, corpus, vit_spec, monkeypatch, capsys):
    import fsspec.config  # --storage-option goes into fsspec's configuration: restored for the tests after this one
    monkeypatch.setattr(fsspec.config, "conf", {k: dict(v) for k, v in fsspec.config.conf.items()})
    run = str(tmp_path / "run")
    assert _train(monkeypatch, capsys, store, corpus, run)[0] == 0
    a_dir, a_file = tmp_path / "dir", tmp_path / "file.txt"
    a_dir.mkdir()
    a_file.write_text("x")
    cases = [
        (["eval", "knn", "--store", store, "--out", str(a_dir)], "is a directory"),
        (["report", run, "--no-knn", "--out", str(a_file)], "exists and is not a directory"),
        (["report", run, "--no-knn", "--out", "/proc/self/report"], "cannot write in /proc"),
        (["export", run, "--out", str(a_dir)], "is a directory"),
        (["export", run, "--out", "/proc/self/student.safetensors"], "cannot write in /proc/self"),
        (["extract", corpus, "--out", str(a_file), "-t", vit_spec, "--workers", "0", "--no-progress"],
         "exists and is not a directory"),
        (["extract", str(a_file), "--out", str(tmp_path / "x.zarr"), "-t", vit_spec, "--workers", "0", "--no-progress"],
         "a file that is not a tar"),
        (["extract", corpus, "--out", "s3://kdcache-nowhere/x.zarr", "-t", vit_spec, "--workers", "0", "--no-progress",
          "--storage-option", "endpoint_url=http://127.0.0.1:9", "--storage-option", "key=k", "--storage-option",
          "secret=s", "--storage-option", "retries=1", "--storage-option", "config_kwargs.retries.max_attempts=1"],
         "s3://kdcache-nowhere/x.zarr"),
        (["train", "--store", store, "--data", corpus, "--student", STUDENT, "--out", store, "--overwrite", "--workers",
          "0", "--no-progress"], "a Zarr store (kdcache's or another's), not a run directory"),
        (["train", "--store", store, "--data", corpus, "--student", "resnet18,img_size=32", "--out", str(tmp_path / "bn"),
          "--batch-size", "1", "--workers", "0", "--no-progress"], "--batch-size 1, and the student"),
        (["store", "copy", store, store, "--no-progress"], "the destination is the source store"),
        (["store", "subset", store, "--shards", "demo-00000[01]", "--out", store + "/", "--no-progress"],
         "the destination is the source store"),
    ]
    before = sorted(os.path.relpath(os.path.join(r, f), store) for r, _, fs in os.walk(store) for f in fs)
    for args, want in cases:
        code, _, err = _run(monkeypatch, capsys, *args)
        assert code == 2 and want in one_error_line(err), (args, err[-2000:])
    assert sorted(os.path.relpath(os.path.join(r, f), store) for r, _, fs in os.walk(store) for f in fs) == before
    assert a_file.read_text() == "x" and not os.path.exists(tmp_path / "x.zarr")
