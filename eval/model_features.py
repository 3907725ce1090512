"""Summary features of a model run live on a labelled corpus: a trained student (or its EMA), or
any timm model (a teacher, a random-init baseline).

Each image passes through the loader's stream (``data.stream``: the corpus's samples screened by
the same walk as extraction, the same pixel stage): decoded with the same limits, cut to its eval view
(the centred ``crop_pct`` box, view 0 of a store) and resized to the model's input, then
normalised with the model's own data config; the feature is the model's summary vector
(``models.taps``: ``forward_head(..., pre_logits=True)``). Samples that do not decode are
skipped and counted in the result.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import safetensors.torch
import timm
import torch
from tqdm import tqdm

from torch.utils.data import DataLoader

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.partition import ShardRows
from kdcache.data.pixels import Crop
from kdcache.data.pixels import corpus_places
from kdcache.data.stream import SampleStream, StreamSpec
from kdcache.data.transport import collate
from kdcache.errors import KdcacheError
from kdcache.train.rundir import RunDir
from kdcache.models.data_config import DataConfig, resolve_data_config
from kdcache.models.spec import ModelSpec
from kdcache.models.student import create_student
from kdcache.models.taps import probe as probe_tap
from kdcache.store.meta import ViewPolicy

from .options import ProbeOptions
from .probes import probe

EVAL_BLOCK = 256  # rows per block of a corpus shard read for evaluation (one ranged read of a tar each)


def _provenance_student(run: str) -> dict:
    student = RunDir(run).read_provenance().get("student")
    if not isinstance(student, dict) or "model" not in student:
        raise KdcacheError(f"--run {run}: provenance.json does not name the student; was the run made by this kdcache?")
    return student


def _student_data(student: dict, model: torch.nn.Module) -> DataConfig:
    d = student.get("data")
    return (DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) if d
            else resolve_data_config(model, ModelSpec.parse_student(student["model"])))


def run_student(run: str, *, ema: bool = False) -> tuple[torch.nn.Module, DataConfig, str]:
    """The trained student of a run directory (the timm kwargs it was built with, its weights)."""
    weights = os.path.join(run, "checkpoints", "last", "ema.safetensors" if ema else "student.safetensors")
    student = _provenance_student(run)
    if not os.path.exists(weights):
        raise KdcacheError(f"--run {run}: no {'EMA ' if ema else ''}student checkpoint ({weights} missing)")
    model = timm.create_model(student["model"], pretrained=False, **student["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file(weights))
    return model.eval(), _student_data(student, model), f"run {run} ({'EMA' if ema else 'student'}, {student['model']})"


def random_init_student(run: str, *, seed: int = 0) -> tuple[torch.nn.Module, DataConfig, str]:
    """The run's student architecture (same timm kwargs) with random weights: the baseline."""
    student = _provenance_student(run)
    torch.manual_seed(seed)
    model = timm.create_model(student["model"], pretrained=False, **student["timm_kwargs"])
    return model.eval(), _student_data(student, model), f"random-init {student['model']}"


def spec_model(text: str) -> tuple[torch.nn.Module, DataConfig, str]:
    """A timm model from a student-style spec (``MODEL[,key=value]``): a teacher run live, or a
    random-init baseline (``pretrained=false``, seed 0)."""
    torch.manual_seed(0)
    s = create_student(text)
    return s.model.eval(), s.data, f"model {text}"


@torch.inference_mode()
def labelled_model_features(model: torch.nn.Module, data: DataConfig, corpus_spec: str | None, *,
                            read: ReadOptions | None = None, batch_size: int = 32, progress: bool = False,
                            images: str | None = None) -> dict:
    """{x (N, D) float32, y (N,), keys, skipped_samples} over the labelled samples of a corpus, in
    corpus order, through the loader's stream (``data.stream``: the eval view, full-size decodes);
    without a corpus, of store ``images``: the pixels it keeps of view 0 (the teacher's eval view)."""
    if corpus_spec is None:
        return _store_pixel_features(model, data, images, batch_size=batch_size, progress=progress)
    corpus = resolve_corpus(corpus_spec, read)
    places = {}
    for name, p in corpus_places(corpus).items():
        places[name] = p.select(i for i in range(len(p)) if p.labels[i] >= 0)
    if not any(len(p) for p in places.values()):
        raise KdcacheError(f"{corpus_spec}: no labelled samples (webdataset 'cls' fields or image-folder classes)")
    spec = StreamSpec(shards=tuple(ShardRows(n, len(p), EVAL_BLOCK) for n, p in places.items() if len(p)),
                      crops=(("image", Crop(data.hw, data.interpolation)),),
                      decode=replace(corpus.options.decode, reduced=False),  # judged as deployed: full-size decodes
                      views="eval", policy=ViewPolicy.for_input(data.crop_pct, data.hw), shuffle=False, skip_bad=True)
    stream = SampleStream(spec, corpus, places=places)
    tap = probe_tap(model, data.hw)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    xs, ys, keys = [], [], []
    total = sum(s.count for s in spec.shards)
    bar = tqdm(total=total, unit="img", desc="features", disable=not progress, dynamic_ncols=True)
    for batch in DataLoader(stream, batch_size=batch_size, collate_fn=collate):
        x = (batch["image"].float() - mean) / std
        xs.append(tap(model, x)[0].float().numpy())
        ys.append(batch["label"].numpy())
        keys += batch["key"]
        bar.update(len(batch["key"]))
    bar.close()
    if not xs:
        raise KdcacheError(f"{corpus_spec}: no labelled sample decodes")
    return {"x": np.concatenate(xs).astype(np.float32), "y": np.concatenate(ys).astype(np.int64), "keys": keys,
            "skipped_samples": total - len(keys)}  # (the labelled images that do not decode)


def _store_pixel_features(model, data: DataConfig, url: str | None, *, batch_size: int, progress: bool) -> dict:
    """Summary features of the labelled samples of a store that keeps its views' pixels: view 0's
    crop (the teacher's eval view, as stored) resized to the model's input; labels as extraction
    recorded them. The model's own eval crop may cut another box than the teacher's (crop_pct)."""
    from kdcache.data.stream import shard_rows
    from kdcache.store import Store
    if not url:
        raise KdcacheError("--data is required (or a store that keeps its views' pixels: --images STORE)")
    store = Store.open(url)
    if store.meta.pixels is None:
        raise KdcacheError(f"--data is required: {url} keeps no pixels (extract --pixels, or kdcache store pixels)")
    spec = StreamSpec(shards=shard_rows(store, store.complete_shards()), crops=(("image", Crop(data.hw, data.interpolation)),),
                      decode=replace(ReadOptions.from_dict(store.meta.corpus).decode, reduced=False),
                      view_choice="first", stored_views=store.meta.views, policy=store.meta.view_policy, shuffle=False,
                      store_url=url, source="pixels")
    tap = probe_tap(model, data.hw)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    xs, ys, keys = [], [], []
    bar = tqdm(total=sum(s.count for s in spec.shards), unit="img", desc="features", disable=not progress,
               dynamic_ncols=True)
    for batch in DataLoader(SampleStream(spec, None), batch_size=batch_size, collate_fn=collate):
        keep = batch["label"] >= 0
        bar.update(len(batch["key"]))
        if not bool(keep.any()):
            continue
        x = (batch["image"][keep].float() - mean) / std
        xs.append(tap(model, x)[0].float().numpy())
        ys.append(batch["label"][keep].numpy())
        keys += [k for k, m in zip(batch["key"], keep.tolist()) if m]
    bar.close()
    if not xs:
        raise KdcacheError(f"{url}: no labelled samples (its corpus had no cls fields or image-folder classes)")
    return {"x": np.concatenate(xs).astype(np.float32), "y": np.concatenate(ys).astype(np.int64), "keys": keys,
            "skipped_samples": 0, "images": f"{url} (view 0 pixels)"}


def probe_model(which: str, data: str | None, options: ProbeOptions = ProbeOptions(), *, run: str | None = None,
                ema: bool = False, model: str | None = None, read: ReadOptions | None = None,
                val_data: str | None = None, progress: bool = False, images: str | None = None) -> dict:
    """``kdcache eval knn|linear --run RUN | --model SPEC``: the probe of a model's live summary
    features; ``val_data``: a given validation corpus instead of the seeded split. Without ``data``,
    on the view pixels of store ``images`` (default: a run's own store)."""
    net, cfg, what = run_student(run, ema=ema) if which == "run" else spec_model(model)
    if data is None and images is None and which == "run":
        images = RunDir(run).read_config().store or None
    f = labelled_model_features(net, cfg, data, read=read, progress=progress, images=images)
    val, skipped = None, f["skipped_samples"]
    if val_data:
        v = labelled_model_features(net, cfg, val_data, read=read, progress=progress)
        val, skipped = (v["x"], v["y"]), skipped + v["skipped_samples"]
    r = probe(f["x"], f["y"], f"{what}, live summary features", resolution=list(cfg.hw), options=options, val=val,
              val_name=val_data)
    return {**r, "skipped_samples": skipped}
