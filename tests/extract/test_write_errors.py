"""Write errors mid-run (disk full, permission lost, a failing object store): one line, the shard
left incomplete, the next run completes it to the same bytes."""
from __future__ import annotations

import errno

import pytest
import zarr.storage
from helpers import assert_same_store, cli_call, one_error_line

from kdcache.extract.options import ExtractOptions

from kdcache.extract.run import extract
from kdcache.store import Store


@pytest.mark.parametrize("fail_after", [3, 40])
def test_a_full_disk_is_one_line_and_the_next_run_completes_the_store(tmp_path, corpus, vit_spec, monkeypatch, capsys,
                                                                        fail_after):
    ref = str(tmp_path / "ref.zarr")
    extract(corpus, ref, [vit_spec], ExtractOptions(views=2, progress=False, workers=0))
    out = str(tmp_path / "s.zarr")
    real_set, calls = zarr.storage.LocalStore.set, []

    async def failing_set(self, key, value):  # the filesystem fills up after a few writes
        calls.append(key)
        if len(calls) > fail_after and "/shards/" in f"/{key}" and "/zarr.json" not in f"/{key}":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    code, _, err = cli_call(monkeypatch, capsys, "extract", corpus, "--out", out, "-t", vit_spec, "--views", "2",
                            "--workers", "0", "--no-progress")
    line = one_error_line(err)
    assert code == 2 and "writing failed" in line and "No space left on device" in line and "incomplete" in line, line
    s = Store.open(out)
    assert len(s.complete_shards()) < 3
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    code, _, err = cli_call(monkeypatch, capsys, "extract", corpus, "--out", out, "-t", vit_spec, "--views", "2",
                            "--workers", "0", "--no-progress")
    assert code == 0, err
    assert_same_store(ref, out)


def test_a_run_killed_between_codebooks_and_metadata_resumes_quantized(tmp_path, many_shards, vit_spec, monkeypatch):
    from kdcache.quantize import convert_store as convert
    opts = dict(views=4, batch_size=2, workers=0, progress=False, quantize="pq:M=12", quantize_sample=256, quantize_pool=1)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "out.zarr")
    extract(many_shards, ref, [vit_spec], ExtractOptions(**opts))
    real = convert.set_teacher_quantizer

    def killed(*a, **k):  # the process dies right after the codebooks were written
        raise KeyboardInterrupt
    monkeypatch.setattr(convert, "set_teacher_quantizer", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(many_shards, out, [vit_spec], ExtractOptions(**opts))
    monkeypatch.setattr(convert, "set_teacher_quantizer", real)
    assert Store.open(out).read_codebooks("vit", "patch") is not None and not Store.open(out).meta.teachers["vit"].quantizer
    extract(many_shards, out, [vit_spec], ExtractOptions(**opts))
    assert_same_store(ref, out)
