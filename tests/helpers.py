"""Independent re-computations used as references by the tests."""
from __future__ import annotations

import io
import sys
import tarfile

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from PIL import Image
from torchvision.transforms import InterpolationMode


def tar_images(path) -> dict[str, np.ndarray]:
    """key -> RGB array, read with tarfile + PIL (not through kdcache's corpus reader)."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.rsplit(".", 1)
            if ext in ("jpg", "png"):
                out[key] = np.array(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    return out


_MODELS: dict = {}


def reference_model(model_name, model_kwargs, weights_path):
    """timm's model with these weights, built once per test process."""
    import safetensors.torch
    key = (model_name, tuple(sorted(model_kwargs.items())), weights_path)
    if key not in _MODELS:
        m = timm.create_model(model_name, pretrained=False, **model_kwargs)
        m.load_state_dict(safetensors.torch.load_file(weights_path))
        _MODELS[key] = m.eval()
    return _MODELS[key]


def reference_features(model_name, model_kwargs, weights_path, image, view, meta):
    """The teacher run directly with timm on the crop a stored view describes (PIL's full-size
    decode, torchvision's resized_crop)."""
    m = reference_model(model_name, model_kwargs, weights_path)
    h, w = image.shape[:2]
    t, l, ch, cw, flip = view
    x = torch.from_numpy(image).permute(2, 0, 1)
    x = TF.resized_crop(x, round(t * h), round(l * w), round(ch * h), round(cw * w), list(meta["input_size"][1:]),
                        interpolation=InterpolationMode(meta["interpolation"]), antialias=True)
    if flip >= 0.5:
        x = x.flip(-1)
    x = (x.float()[None] / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        f = m.forward_features(x)
        summary = m.forward_head(f, pre_logits=True)[0]
    patches = f[0, m.num_prefix_tokens:] if f.ndim == 3 else f[0].flatten(1).T
    return summary.numpy(), patches.numpy()


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every array of every complete shard, read with plain zarr."""
    root = zarr.open_group(path, mode="r")
    out = {}
    for name, g in root["shards"].groups():
        if g.attrs.get("complete") is not True:
            continue
        for p, a in g.members(max_depth=None):
            if isinstance(a, zarr.Array):
                out[f"{name}/{p}"] = np.asarray(a[:])
    return out


def assert_same_store(a, b):
    xa, xb = store_arrays(a), store_arrays(b)
    assert sorted(xa) == sorted(xb), (sorted(set(xa) ^ set(xb)))
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def cli_call(monkeypatch, capsys, *args):
    """``kdcache ARGS`` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    from kdcache import cli
    monkeypatch.setattr(sys, "argv", ["kdcache", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_error_line(err: str) -> str:
    """The one ``kdcache: error:`` line of stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("kdcache: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def verify_store(url, data=None):
    """``kdcache verify URL [--data DATA]`` as a function: the store alone, or against its corpus."""
    if data is None:
        from kdcache.store.verify import verify_store as verify_alone
        return verify_alone(url)
    from kdcache.data.corpus_keys import verify_with_corpus
    return verify_with_corpus(url, data)


def multiteacher_cfg(store, corpus, out, *, student, **kw):
    """A tiny multi-teacher training config (2 epochs of batch 4, 32-wide heads, every step logged)."""
    from kdcache.train.config import TrainConfig
    base = dict(store=store, data=corpus, student=student, out=str(out), epochs=2, batch_size=4, workers=0, lr=2e-3,
                warmup_steps=2, head_hidden=32, log_every=1, amp="none")
    return TrainConfig(**{**base, **kw})


def metrics_rows(run) -> list[dict]:
    """RUN/metrics.csv as a list of rows."""
    import csv
    import os
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def store_stream(store_url, corpus, paths=(), *, epoch=0, rank=0, world=1, size=(32, 32), interpolation="bicubic",
                 window=4, workers=0, **kw):
    """The loader's stream over a store and its corpus as training builds it (``data.stream``): the
    student's crop at ``size``, the store's decode, a window of ``window``, targets ``paths``."""
    from kdcache.data.corpus import ReadOptions, resolve_corpus
    from kdcache.data.pixels import Crop
    from kdcache.data.stream import SampleStream, StreamSpec, shard_rows
    from kdcache.store import Store
    s = Store.open(store_url)
    read = ReadOptions.from_dict(s.meta.corpus)
    spec = StreamSpec(shards=shard_rows(s, s.complete_shards()), crops=(("image", Crop(tuple(size), interpolation)),),
                      decode=read.decode, stored_views=s.meta.views, policy=s.meta.view_policy, window=window,
                      store_url=store_url, target_paths=tuple(paths), workers=workers, **kw)
    return SampleStream(spec, resolve_corpus(corpus, read) if corpus else None, rank=rank, world=world, epoch=epoch)
