"""kdcache train: the loader delivers exactly the stored targets and the teacher's pixels, the
loss falls, resume is exact, errors are clear, the export loads in timm."""
from __future__ import annotations

import dataclasses
import json

import glob
import os
import shutil
import tarfile

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import timm
import torch
import zarr
from conftest import VIT
from helpers import store_stream, tar_images

from kdcache.extract.options import ExtractOptions

from kdcache.extract.run import extract
from kdcache.quantize.convert_store import quantize_store
from kdcache.quantize.methods import faiss_decode
from kdcache.quantize.quantizer_spec import QuantizerSpec
from kdcache.targets.sample import SampleSpec
from kdcache.store import Store
from kdcache.train.config import Optimisation, TrainConfig
from kdcache.train.config_files import build_config
from kdcache.data.transport import collate
from kdcache.errors import StoreError
from kdcache.train.sources import TrainError
from kdcache.train.fit import train
from kdcache.targets.decoding import TargetDecoder, stored_codebooks
from kdcache.train.losses import LossSpec, codes_loss

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


@pytest.fixture(scope="module")
def store(vit_store):
    return vit_store


@pytest.fixture(scope="module")
def pq_store(tmp_path_factory, corpus, vit_spec):
    out = str(tmp_path_factory.mktemp("trainpq") / "s.zarr")
    extract(corpus, out, [vit_spec], ExtractOptions(views=4, progress=False, workers=0))
    quantize_store(out, "vit", QuantizerSpec.parse("pq:m=8"), sample=SampleSpec(train_tokens=256, held_out=32, pool=1),
                   progress=False)
    return out


def _cfg(store, corpus, out, **kw):
    base = dict(store=store, data=corpus, student=STUDENT, out=str(out), epochs=2, batch_size=4, workers=1, lr=2e-3,
                warmup_steps=2, head_hidden=64, log_every=1, amp="none")
    return TrainConfig(**{**base, **kw})


def _stream(store, corpus, paths, *, epoch=0, rank=0, world=1, **kw):
    return store_stream(store, corpus, paths, epoch=epoch, rank=rank, world=world, **kw)


def test_loader_targets_equal_the_store_and_pixels_equal_the_teachers_crop(store, corpus, weights):
    s = Store.open(store)
    images = {}
    for tar in glob.glob(os.path.join(corpus, "*.tar")):
        images.update(tar_images(tar))
    teacher = timm.create_model(VIT["model"], pretrained=False, img_size=32, depth=2)
    teacher.load_state_dict(safetensors.torch.load_file(weights["vit"]))
    teacher.eval()
    seen = 0
    for sample in _stream(store, corpus, ("vit/cls", "vit/patch"), epoch=1):
        shard = next(n for n in s.complete_shards() if sample["key"] in s.keys(n).tolist())
        row = s.keys(shard).tolist().index(sample["key"])
        v = sample["view"]
        np.testing.assert_array_equal(sample["vit/patch"].numpy(), s.array(shard, "vit/patch")[row, v])
        np.testing.assert_array_equal(sample["vit/cls"].numpy(), s.array(shard, "vit/cls")[row, v])
        # the pixels: the teacher itself, run on the loader's image, gives the stored features
        x = (sample["image"].float()[None] / 255 - 0.5) / 0.5
        with torch.no_grad():
            f = teacher.forward_features(x)
        np.testing.assert_allclose(f[0, 1:].numpy(), s.array(shard, "vit/patch")[row, v].astype(np.float32), atol=3e-3, rtol=3e-3)
        seen += 1
    assert seen == 24


def test_every_key_once_per_epoch_across_ranks_and_views_rotate(store, corpus):
    keys = {rank: [b["key"] for b in _stream(store, corpus, ("vit/cls",), epoch=0, rank=rank, world=2)] for rank in (0, 1)}
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) + len(keys[1]) == 24
    v0 = {b["key"]: b["view"] for b in _stream(store, corpus, ("vit/cls",), epoch=0)}
    v1 = {b["key"]: b["view"] for b in _stream(store, corpus, ("vit/cls",), epoch=1)}
    assert all(v0[k] != v1[k] for k in v0)  # K=2, 'epoch' choice: the other view next epoch
    o0 = [b["key"] for b in _stream(store, corpus, ("vit/cls",), epoch=0)]
    o1 = [b["key"] for b in _stream(store, corpus, ("vit/cls",), epoch=1)]
    assert o0 != o1 and sorted(o0) == sorted(o1)  # reshuffled per epoch


def test_quantized_targets_decode_on_device_to_faiss_decode(pq_store, corpus):
    s = Store.open(pq_store)
    tt = TargetDecoder("vit", s.meta.teachers["vit"], codebooks=stored_codebooks(s, "vit"), normalize="none", stats=None)
    assert tt.paths["patch"] == "vit/patch_codes"
    batch = collate(list(_stream(pq_store, corpus, ("vit/cls", "vit/patch_codes")))[:5])
    assert batch["vit/patch_codes"].dtype == torch.uint8 and batch["vit/cls"].dtype == torch.float16
    got = tt(batch)["patch"]
    cb = s.read_codebooks("vit", "patch")
    ref = faiss_decode(cb, batch["vit/patch_codes"].numpy().reshape(-1, 8)).reshape(got.shape)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", ["standardize", "phi-s"])
def test_loss_decreases_and_run_dir_is_complete(tmp_path, store, corpus, normalize):
    out = train(_cfg(store, corpus, tmp_path / "run", epochs=4, normalize=normalize, ema=0.9))
    import csv
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == out["steps"] == 4 * 6
    first, last = np.mean([float(r["loss"]) for r in rows[:3]]), np.mean([float(r["loss"]) for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    for f in ("config.json", "provenance.json", "loss.png", "checkpoints/last/student.safetensors",
              "checkpoints/last/heads.safetensors", "checkpoints/last/ema.safetensors", "checkpoints/last/optimizer.pt"):
        assert os.path.exists(tmp_path / "run" / f), f
    assert glob.glob(str(tmp_path / "run" / "tb" / "events.*"))
    # extraction wrote fresh statistics into the store; training used them and wrote nothing there
    st = zarr.open_group(store, mode="r")["stats/vit/patch"]
    assert st.attrs["ready"] and st["covariance"].shape == (192, 192) and not os.path.exists(tmp_path / "run" / "stats")


def test_codes_prediction_trains_on_a_quantized_store(tmp_path, pq_store, corpus):
    out = train(_cfg(pq_store, corpus, tmp_path / "run", epochs=1, predict_codes=True))
    assert out["steps"] == 6


def test_resume_equals_uninterrupted(tmp_path, store, corpus):
    train(_cfg(store, corpus, tmp_path / "full"))
    train(_cfg(store, corpus, tmp_path / "split", stop_at_step=4))  # stops mid-epoch 1 (6 steps/epoch)
    out = train(_cfg(store, corpus, tmp_path / "split", resume=True))
    assert out["steps"] == 12
    for f in ("student.safetensors", "heads.safetensors"):
        a = safetensors.torch.load_file(str(tmp_path / "full" / "checkpoints" / "last" / f))
        b = safetensors.torch.load_file(str(tmp_path / "split" / "checkpoints" / "last" / f))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = open(tmp_path / "split" / "metrics.csv").read().splitlines()
    assert len(rows) == 1 + 12  # rows up to the checkpoint kept, none doubled


@pytest.mark.parametrize("student", [STUDENT, "resnet18,img_size=32,global_pool=max"])
def test_export_load_line_rebuilds_the_student_in_timm(tmp_path, store, corpus, student):
    from kdcache.train.export import export
    train(_cfg(store, corpus, tmp_path / "run", epochs=1, student=student), progress=False)
    res = export(str(tmp_path / "run"))
    scope = {"timm": timm}
    exec(f"m = {res['load_with']}", scope)  # the printed line, run as a user would paste it
    sd = safetensors.torch.load_file(str(tmp_path / "run" / "checkpoints" / "last" / "student.safetensors"))
    assert sorted(scope["m"].state_dict()) == sorted(sd)
    for k, v in scope["m"].state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    assert ("global_pool='max'" in res["load_with"] and "img_size" not in res["load_with"]) or "depth=1" in res["load_with"]


def test_store_from_another_corpus_or_missing_shards_fails_clearly(tmp_path, store, corpus, many_shards):
    with pytest.raises(TrainError, match="is another corpus"):
        train(_cfg(store, many_shards, tmp_path / "a"))
    partial = str(tmp_path / "partial.zarr")
    shutil.copytree(store, partial)
    g = zarr.open_group(partial, mode="r+")["shards/demo-000001"]
    g.attrs.put({**g.attrs.asdict(), "complete": False})
    # the shard index still says complete: the run plans the shard and refuses it when it reads its metadata
    with pytest.raises(StoreError, match=r"shard demo-000001 is not complete, though the run planned it complete"):
        train(_cfg(partial, corpus, tmp_path / "b", workers=0))
    os.remove(os.path.join(partial, "shard_index.json"))  # without the index, the plan reads every shard's metadata
    with pytest.raises(TrainError, match=r"1 of 3 corpus shard\(s\) are not complete in the store \(first: demo-000001\)"):
        train(_cfg(partial, corpus, tmp_path / "c"))


def test_key_mismatch_names_shard_and_key(tmp_path, store, corpus):
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    with tarfile.open(os.path.join(corpus, "demo-000000.tar")) as tin, tarfile.open(other / "demo-000000.tar", "w") as tout:
        members = tin.getmembers()
        for m in members[2:]:  # drop the first sample
            tout.addfile(m, tin.extractfile(m))
    from kdcache.data.walk import AlignError
    # the store records where each image is and its CRC-32: the first image read is no longer the one extracted
    with pytest.raises(AlignError, match=r"shard demo-000000: sample '.+': its image bytes are not those extracted"):
        list(_stream(store, str(other), ("vit/cls",), shuffle=False))


def test_config_file_and_cli_override(tmp_path, store, corpus):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"store: {store}\ndata: {corpus}\nstudent: {STUDENT}\nout: {tmp_path / 'run'}\nepochs: 3\nbatch-size: 8\n")
    cfg = build_config(str(cfg_file), epochs=1, lr=None)
    assert (cfg.optimisation.epochs, cfg.data.batch_size, cfg.optimisation.lr) == (1, 8, Optimisation.lr)
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: x\nlearning_rate: 3\n")
    from kdcache.store import KdcacheError
    with pytest.raises(KdcacheError, match="unknown option.*learning_rate"):
        build_config(str(bad))


def test_a_config_file_mirrors_the_sections_and_config_json_reads_back(tmp_path, store, corpus):
    """YAML and TOML files hold the sections as TrainConfig does; the CLI overrides them; a key
    outside its section's fields is one line naming section and key; RUN/config.json (to_dict)
    reads back to the same config, and so does a run directory's flat config.json of before."""
    yaml_file, toml_file = tmp_path / "run.yaml", tmp_path / "run.toml"
    yaml_file.write_text(f"store: {store}\nstudent: {STUDENT}\nout: {tmp_path / 'run'}\nseed: 3\n"
                         f"optimisation:\n  lr: 0.003\n  opt: sgd\n  sched: step\n"
                         f"data:\n  corpus: {corpus}\n  batch-size: 8\n"
                         f"balance:\n  method: mgda\n  teacher-weights: {{vit: 2.0}}\n"
                         f"objectives:\n  patch-loss: cosine\n")
    toml_file.write_text(f'store = "{store}"\nstudent = "{STUDENT}"\nout = "{tmp_path / "run"}"\nseed = 3\n'
                         f'[optimisation]\nlr = 0.003\nopt = "sgd"\nsched = "step"\n'
                         f'[data]\ncorpus = "{corpus}"\nbatch_size = 8\n'
                         f'[balance]\nbalance = "mgda"\nteacher_weights = {{vit = 2.0}}\n'
                         f'[objectives]\npatch_loss = "cosine"\n')
    a, b = build_config(str(yaml_file)), build_config(str(toml_file))
    assert a == b
    assert (a.optimisation.lr, a.optimisation.opt, a.optimisation.sched, a.data.batch_size, a.data.corpus) == \
        (0.003, "sgd", "step", 8, corpus)
    assert (a.balance.method, a.balance.teacher_weights, a.objectives.patch_loss, a.seed) == \
        ("mgda", {"vit": 2.0}, "cosine", 3)
    assert build_config(str(yaml_file), lr=0.01, balance="static").optimisation.lr == 0.01
    assert TrainConfig.from_dict(json.loads(a.to_json())) == a  # RUN/config.json
    assert TrainConfig.from_dict(a.options()) == a  # a flat config.json (a run from before the sections)
    assert set(json.loads(a.to_json())) == {"store", "student", "out", "teachers", "seed", "device", "log_every",
                                            "checkpoint_every", "stop_at_step", "resume", "overwrite", "optimisation",
                                            "objectives", "heads", "balance", "data", "online"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"store: {store}\nstudent: x\nout: o\noptimisation:\n  batch_size: 8\n")
    from kdcache.store import KdcacheError
    with pytest.raises(KdcacheError, match=r"optimisation.batch_size: not an option of section 'optimisation'"):
        build_config(str(bad))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seed = 4
    assert a.replace(seed=4).seed == 4 and a.seed == 3


def test_code_logits_loss_prefers_the_true_codes():
    codes = torch.randint(0, 256, (4, 10, 6), dtype=torch.uint8)
    good = torch.nn.functional.one_hot(codes.long(), 256).float().reshape(4, 10, 6 * 256) * 20
    assert codes_loss(good, codes, LossSpec()) < 1e-3 < codes_loss(torch.zeros_like(good), codes, LossSpec())


def test_autocast_is_bf16_on_cuda_and_off_on_a_cpu_by_default(tmp_path, store, corpus):
    from kdcache.train.fit import build_run
    assert Optimisation.amp == "auto"
    for amp, on_cpu in (("auto", False), ("bf16", True), ("none", False)):
        run = build_run(_cfg(store, corpus, tmp_path / amp, amp=amp, epochs=1))
        assert run.trainer.autocast is on_cpu
