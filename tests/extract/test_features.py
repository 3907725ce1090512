"""Extraction against independent computations: timm run directly, views recomputed, plain zarr."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import zarr

from kdcache.extract.options import ExtractError, ExtractOptions

from kdcache.extract.run import extract
from kdcache.data import pixels as pixels_mod
from kdcache.data.views import sample_views
from kdcache.store import Store
from kdcache.store.dtypes import bf16_bits_to_float32

from conftest import CNN, VIT
from helpers import assert_same_store, reference_features, store_arrays, tar_images

OPTS = dict(progress=False, workers=0, batch_size=5)


def _kwargs(spec):
    return {k: int(v) for k, v in (kv.split("=") for kv in spec["kwargs"].split(",")) if k != "img_size" or spec is VIT}


@pytest.mark.parametrize("which", ["vit", "cnn"])
def test_features_equal_timm_on_the_stored_views(tmp_path, corpus, weights, vit_spec, cnn_spec, which):
    """Under the default options, every stored view of every image equals the teacher run directly
    with timm on the view cut from PIL's full-size decode (cosine >= 0.999 and within fp16 rounding)."""
    import torch
    spec, model = (vit_spec, VIT) if which == "vit" else (cnn_spec, CNN)
    out = str(tmp_path / "s.zarr")
    s = extract(corpus, out, [spec], ExtractOptions(views=3, seed=7, **OPTS))
    assert s.images == 24 and s.failed == 0 and s.shards_written == 3
    root = zarr.open_group(out, mode="r")
    meta = root.attrs["kdcache"]["teachers"][which]
    if which == "vit":
        assert (meta["grid"], meta["prefix_tokens"], meta["dim"], meta["patch_size"]) == ([2, 2], 1, 192, [16, 16])
    else:
        assert (meta["grid"], meta["prefix_tokens"], meta["dim"], meta["patch_size"]) == ([1, 1], 0, 512, [32, 32])
    checked = 0
    for tar in sorted(glob.glob(os.path.join(corpus, "*.tar"))):
        images = tar_images(tar)
        g = root[f"shards/{os.path.basename(tar)[:-4]}"]
        keys = list(g["keys"][:])
        assert keys == list(images)  # corpus order, nothing lost
        cls, patch = g[f"{which}/cls"][:].astype(np.float32), g[f"{which}/patch"][:].astype(np.float32)
        for i in range(len(keys)):
            for v in range(3):
                ref_cls, ref_patch = reference_features(model["model"], _kwargs(model), weights[which], images[keys[i]],
                                                        g["views"][i, v], meta)
                np.testing.assert_allclose(cls[i, v], ref_cls, rtol=2e-3, atol=2e-3)
                np.testing.assert_allclose(patch[i, v], ref_patch, rtol=2e-3, atol=2e-3)
                cos = torch.nn.functional.cosine_similarity(torch.from_numpy(np.concatenate([cls[i, v][None], patch[i, v]])),
                                                            torch.from_numpy(np.concatenate([ref_cls[None], ref_patch])))
                assert float(cos.min()) >= 0.999, (keys[i], v, float(cos.min()))
                checked += 1
    assert checked == 24 * 3


def test_views_replay_from_key_and_size_alone(tmp_path, corpus, vit_spec):
    out = str(tmp_path / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(views=4, seed=3, **OPTS))
    store = Store.open(out)
    policy = store.meta.view_policy
    images = {}
    for tar in glob.glob(os.path.join(corpus, "*.tar")):
        images.update(tar_images(tar))
    for shard in store.complete_shards():
        for key, stored in zip(store.keys(shard), store.views(shard)):
            h, w = images[key].shape[:2]
            np.testing.assert_array_equal(sample_views(policy, key, h, w), stored)
            # view 0 = centred eval crop of crop_pct of the short side, never flipped
            side = round(policy.crop_pct * min(h, w))
            np.testing.assert_allclose(stored[0], [round((h - side) / 2) / h, round((w - side) / 2) / w, side / h, side / w, 0],
                                       atol=1e-6)
            assert np.all(stored[1:, 2:4] <= 1) and set(np.unique(stored[:, 4])) <= {0.0, 1.0}
    # a different seed draws different views
    other = sample_views(policy.__class__(**{**policy.to_dict(), "scale": tuple(policy.scale), "ratio": tuple(policy.ratio), "seed": 4}), "k", 50, 60)
    assert not np.array_equal(other[1:], sample_views(policy, "k", 50, 60)[1:])


def test_multi_teacher_single_pass_decodes_each_image_once(tmp_path, corpus, vit_spec, cnn_spec, monkeypatch):
    calls = []
    real = pixels_mod.decode_sample
    monkeypatch.setattr(pixels_mod, "decode_sample", lambda sample, opts, need=None: calls.append(1) or real(sample, opts, need))
    both = str(tmp_path / "both.zarr")
    extract(corpus, both, [vit_spec, cnn_spec], ExtractOptions(views=2, **OPTS))
    assert len(calls) == 24
    vit_only, cnn_only = str(tmp_path / "v.zarr"), str(tmp_path / "c.zarr")
    extract(corpus, vit_only, [vit_spec], ExtractOptions(views=2, **OPTS))
    # view 0 takes crop_pct from the first teacher (the ViT's 0.9): give the CNN-only run the same
    extract(corpus, cnn_only, [cnn_spec + ",crop_pct=0.9"], ExtractOptions(views=2, **OPTS))
    a, v, c = store_arrays(both), store_arrays(vit_only), store_arrays(cnn_only)
    for k, x in a.items():
        np.testing.assert_array_equal(x, (v if "/cnn/" not in k else c)[k], err_msg=k)


def test_adding_a_teacher_reuses_stored_views(tmp_path, corpus, vit_spec, cnn_spec):
    together, later = str(tmp_path / "t.zarr"), str(tmp_path / "l.zarr")
    extract(corpus, together, [vit_spec, cnn_spec], ExtractOptions(views=3, seed=5, **OPTS))
    extract(corpus, later, [vit_spec], ExtractOptions(views=3, seed=5, **OPTS))
    s = extract(corpus, later, [cnn_spec], ExtractOptions(views=3, seed=5, **OPTS))
    assert s.shards_written == 3 and s.images == 24
    assert_same_store(together, later)
    assert set(Store.open(later).meta.teachers) == {"vit", "cnn"}
    again = extract(corpus, later, [vit_spec, cnn_spec], ExtractOptions(views=3, seed=5, **OPTS))
    assert again.shards_written == 0 and again.shards_skipped == 3
    with pytest.raises(ExtractError, match="--views 3 --seed 5"):
        extract(corpus, later, [cnn_spec], ExtractOptions(views=3, seed=6, **OPTS))
    with pytest.raises(ExtractError, match="--views 3 --seed 5"):
        extract(corpus, later, [cnn_spec], ExtractOptions(views=2, seed=5, **OPTS))


def test_store_is_plain_zarr_with_provenance(tmp_path, corpus, vit_spec):
    out = str(tmp_path / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(views=2, codec="zstd", **OPTS))
    with open(os.path.join(out, "zarr.json")) as f:
        doc = json.load(f)["attributes"]["kdcache"]
    assert doc["format"] == 4 and doc["views"] == 2 and doc["seed"] == 0
    t = doc["teachers"]["vit"]
    for k in ("model", "weights_sha256", "input_size", "mean", "std", "interpolation", "patch_size", "grid", "dim",
              "tokens", "dtype", "codec"):
        assert k in t, k
    assert t["input_size"] == [3, 32, 32] and t["dtype"] == "float16" and t["codec"] == "zstd" and len(t["weights_sha256"]) == 64
    assert doc["corpus"]["spec"] == corpus and doc["summary"]["samples"] == 24
    g = zarr.open_group(out, mode="r")["shards/demo-000000"]
    assert g.attrs["complete"] is True and g.attrs["count"] == 8 and g.attrs["failed"] == []
    assert set(g.attrs["digest"]) == {"keys", "views", "origin", "vit/cls", "vit/patch"}
    # origin: where each image is in its tar, its bytes' CRC-32 and its label, as tarfile and zlib read them
    import tarfile
    import zlib
    with tarfile.open(os.path.join(corpus, "demo-000000.tar")) as tar:
        members = {m.name: m for m in tar.getmembers()}
        want = []
        for key in g["keys"][:].tolist():
            image = next(m for n, m in members.items() if n.startswith(key + ".") and n.rsplit(".", 1)[1] in ("png", "jpg"))
            label = int(tar.extractfile(members[key + ".cls"]).read()) if key + ".cls" in members else -1
            want.append((image.offset_data, image.size, zlib.crc32(tar.extractfile(image).read()), label))
    np.testing.assert_array_equal(g["origin"][:], np.array(want, dtype=np.int64))
    assert g.attrs["block"] == g["vit/patch"].shards[0]
    assert g["vit/patch"].shape == (8, 2, 4, 192) and g["vit/patch"].dtype == np.float16
    assert g["vit/patch"].shards[1:] == (1, 4, 192) and g["vit/cls"].shards[1] == 1  # a Zarr shard per view
    assert g["views"].shape == (8, 2, 5) and g["keys"].shape == (8,)


def test_bfloat16_and_float32_storage(tmp_path, corpus, vit_spec):
    f32, bf16 = str(tmp_path / "f.zarr"), str(tmp_path / "b.zarr")
    extract(corpus, f32, [vit_spec], ExtractOptions(dtype="float32", **OPTS))
    extract(corpus, bf16, [vit_spec], ExtractOptions(dtype="bfloat16", **OPTS))
    g = zarr.open_group(bf16, mode="r")["shards/demo-000001/vit/patch"]
    assert g.dtype == np.uint16 and g.attrs["logical_dtype"] == "bfloat16"
    ref = zarr.open_group(f32, mode="r")["shards/demo-000001/vit/patch"][:]
    np.testing.assert_allclose(bf16_bits_to_float32(g[:]), ref, rtol=1e-2, atol=1e-2)
    p = Store.open(bf16).read_features("demo-000001", "vit", "patch")
    assert p.dtype == np.float32 and np.allclose(p, ref, rtol=1e-2, atol=1e-2)


def test_image_folder_corpus_and_memory_store(tmp_path, corpus, vit_spec):
    from PIL import Image
    from helpers import tar_images
    folder = tmp_path / "imgs"
    imgs = tar_images(os.path.join(corpus, "demo-000000.tar"))
    for i, (k, a) in enumerate(sorted(imgs.items())):
        cls = "even" if i % 2 == 0 else "odd"
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / cls / f"img{i}.png")
    (folder / "README.txt").write_text("not an image, ignored")
    url = "memory://kdcache-test/folder.zarr"
    s = extract(str(folder), url, [vit_spec], ExtractOptions(folder_shard_size=3, **OPTS))
    assert s.images == 8 and s.shards_written == 3
    store = Store.open(url)
    assert store.complete_shards() == ["part-000000", "part-000001", "part-000002"]
    assert store.keys("part-000000").tolist() == ["even/img0", "even/img2", "even/img4"]
    assert store.meta.corpus["classes"] == ["even", "odd"]


def test_corpus_behind_an_fsspec_url(tmp_path, corpus, vit_spec):
    import fsspec
    fs = fsspec.filesystem("memory")
    for tar in sorted(glob.glob(os.path.join(corpus, "*.tar"))):
        with open(tar, "rb") as f:
            fs.pipe(f"/kdcache-corpus/{os.path.basename(tar)}", f.read())
    local, remote = str(tmp_path / "l.zarr"), str(tmp_path / "r.zarr")
    extract(corpus, local, [vit_spec], ExtractOptions(**OPTS))
    s = extract("memory://kdcache-corpus/demo-{000000..000002}.tar", remote, [vit_spec], ExtractOptions(**OPTS))
    assert s.images == 24
    a, b = store_arrays(local), store_arrays(remote)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_random_init_teacher_is_the_same_in_every_process_so_reruns_resume(tmp_path, corpus):
    import subprocess
    import sys
    import torch
    from kdcache.models.teacher import create_teacher
    spec = "r=vit_tiny_patch16_224,pretrained=false,img_size=32,depth=1"
    state = torch.get_rng_state()
    a = create_teacher(spec).meta.weights_sha256
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    other = subprocess.run([sys.executable, "-c", f"from kdcache.models.teacher import create_teacher; "
                            f"print(create_teacher({spec!r}).meta.weights_sha256)"], capture_output=True, text=True)
    assert other.stdout.strip() == a
    out = str(tmp_path / "s.zarr")
    extract(corpus, out, [spec], ExtractOptions(**OPTS))
    again = extract(corpus, out, [spec], ExtractOptions(**OPTS))
    assert (again.shards_written, again.shards_skipped) == (0, 3)


def test_the_default_codec_compresses_only_what_lz4_shrinks(two_teachers):
    """``--codec auto``: each array's codec is chosen from its bytes: lz4 where Blosc itself stores
    the shard's rows in at most 95% of what they take uncompressed (a partial last inner chunk
    stored at full size, as zarr stores it), else none. Checked against Blosc on the same rows."""
    import numcodecs.blosc
    s = Store.open(two_teachers)
    assert s.meta.teachers["vit"].codec == s.meta.teachers["cnn"].codec == "auto"
    chosen = {}
    for path in ("vit/patch", "vit/cls", "cnn/patch", "cnn/cls"):
        a = s.array("demo-000000", path)
        sharding = a.metadata.to_dict()["codecs"][0]["configuration"]
        rows = np.ascontiguousarray(np.asarray(a[:]))
        packed = numcodecs.blosc.compress(rows.view(np.uint8).reshape(-1), b"lz4", 5, numcodecs.blosc.SHUFFLE,
                                          rows.dtype.itemsize)
        chunk = sharding["chunk_shape"][0]
        padded = -(-len(rows) // chunk) * chunk * rows[0].nbytes
        chosen[path] = any(c["name"] == "blosc" for c in sharding["codecs"])
        assert chosen[path] == (len(packed) <= 0.95 * padded), path
    assert chosen["cnn/patch"]  # post-ReLU maps: lz4 either way
