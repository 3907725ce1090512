"""targets: stored bytes -> normalised floats on the device; the statistics readers use."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from kdcache.errors import CorruptShardError
from kdcache.store import Store
from kdcache.store.dtypes import to_float32
from kdcache.store.meta import TeacherMeta
from kdcache.targets.decoding import Normalizer, TargetDecoder, to_float
from kdcache.targets.normalize import normalizer_params
from kdcache.targets.stats import compute_stats, reader_stats


@pytest.mark.parametrize("name", ["standardize", "phi-s", "none"])
def test_normalizers_invert_to_the_teacher_space(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 3
    stats = {"mean": x.mean(0), "covariance": np.cov(x.T)}
    n = Normalizer(normalizer_params(name, stats, 12))
    t = torch.from_numpy(x).float()
    torch.testing.assert_close(n.inverse(n(t)), t, rtol=1e-4, atol=1e-4)


def test_standardized_targets_have_zero_mean_and_unit_variance_per_channel():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 8)) * np.arange(1, 9) + 5
    n = Normalizer(normalizer_params("standardize", {"mean": x.mean(0), "covariance": np.cov(x.T)}, 8))
    y = n(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(0, ddof=1), 1, atol=1e-3)


def test_bf16_bits_widen_on_the_device_as_the_store_widens_them_in_numpy():
    values = torch.tensor([[1.5, -2.25, 3e-3], [65504.0, -0.0, 7.0]], dtype=torch.bfloat16)
    bits = values.view(torch.uint16).numpy()  # what the store holds
    got = to_float(torch.from_numpy(bits), "bfloat16")
    np.testing.assert_array_equal(got.numpy(), to_float32(bits, "bfloat16"))
    np.testing.assert_array_equal(got.numpy(), values.float().numpy())


def test_decoder_turns_a_batch_of_stored_rows_into_normalised_targets(vit_store):
    s = Store.open(vit_store)
    meta: TeacherMeta = s.meta.teachers["vit"]
    stats = {kind: s.read_stats("vit", kind) for kind in ("cls", "patch")}
    dec = TargetDecoder("vit", meta, codebooks={}, normalize="standardize", stats=stats)
    assert dec.paths == {"cls": "vit/cls", "patch": "vit/patch"}
    shard = s.complete_shards()[0]
    cls, patch = s.read_features(shard, "vit", "cls")[:3, 0], s.read_features(shard, "vit", "patch")[:3, 0]
    out = dec({"vit/cls": torch.from_numpy(cls).half(), "vit/patch": torch.from_numpy(patch).half()})
    std = np.sqrt(np.diag(stats["patch"]["covariance"]))  # independently: (x - mean) / std per channel
    np.testing.assert_allclose(out["patch"].numpy(), (patch - stats["patch"]["mean"]) / std, rtol=1e-4, atol=1e-4)
    assert out["summary"].shape == (3, meta.dim)


def test_reader_statistics_store_first_then_kept_then_computed(tmp_path, vit_store):
    copy = str(tmp_path / "s.zarr")
    shutil.copytree(vit_store, copy)
    s = Store.open(copy)
    st, computed = reader_stats(s, "vit", "patch")
    assert not computed and st["count"] == s.read_stats("vit", "patch")["count"]
    shutil.rmtree(os.path.join(copy, "stats"))
    s = Store.open(copy)
    fresh = compute_stats(s, "vit", "patch")
    st, computed = reader_stats(s, "vit", "patch", kept=fresh)
    assert not computed and st is fresh  # an earlier computation, still fresh: reused
    stale = {**fresh, "source": {**fresh["source"], "digests": {"demo-000000": {"vit/patch": "0" * 64}}}}
    st, computed = reader_stats(s, "vit", "patch", kept=stale)
    assert computed and np.array_equal(st["mean"], fresh["mean"])


def test_a_corrupt_shard_is_named_and_left_out_of_the_statistics_on_request(tmp_path, vit_store):
    copy = str(tmp_path / "s.zarr")
    shutil.copytree(vit_store, copy)
    shutil.rmtree(os.path.join(copy, "stats"))
    d = os.path.join(copy, "shards", "demo-000000", "vit", "patch", "c")
    chunk = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs][0]
    b = bytearray(open(chunk, "rb").read())
    b[100] ^= 0x40  # in the first inner chunk's rows (an uncompressed last chunk is padded: a flip there changes no row)
    open(chunk, "wb").write(bytes(b))
    s = Store.open(copy)
    with pytest.raises(CorruptShardError) as e:
        reader_stats(s, "vit", "patch")
    assert e.value.shard == "demo-000000"
    st, computed = reader_stats(s, "vit", "patch", skip_corrupt=True)
    assert computed and "demo-000000" not in st["source"]["sampled_from"]["shards"]
