"""Summary features of a model run live on a labelled corpus: a trained student (or its EMA), or
any timm model (a teacher, a random-init baseline).

Each image passes through the same walk as extraction (``data.walk.screened``) and the same
pixel stage (``data.pixels.view_pixels``): decoded with the same limits, cut to its eval view
(the centred ``crop_pct`` box, view 0 of a store) and resized to the model's input, then
normalised with the model's own data config; the feature is the model's summary vector
(``models.taps``: ``forward_head(..., pre_logits=True)``). Samples that do not decode are
skipped and counted in the result.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import safetensors.torch
import timm
import torch
from tqdm import tqdm

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.pixels import Crop, view_at, view_pixels
from kdcache.data.walk import record_to, screened
from kdcache.errors import KdcacheError
from kdcache.models.data_config import DataConfig, resolve_data_config
from kdcache.models.spec import ModelSpec
from kdcache.models.student import create_student
from kdcache.models.taps import probe as probe_tap
from kdcache.store.meta import ViewPolicy

from .options import ProbeOptions
from .probes import probe


def _provenance_student(run: str) -> dict:
    prov = os.path.join(run, "provenance.json")
    if not os.path.exists(prov):
        raise KdcacheError(f"--run {run}: not a kdcache run directory ({prov} missing)")
    with open(prov) as f:
        return json.load(f)["student"]


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
def labelled_model_features(model: torch.nn.Module, data: DataConfig, corpus_spec: str, *, read: ReadOptions | None = None,
                            batch_size: int = 32, progress: bool = False) -> dict:
    """{x (N, D) float32, y (N,), keys, skipped_samples} over the labelled samples of a corpus."""
    corpus = resolve_corpus(corpus_spec, read)
    tap = probe_tap(model, data.hw)
    policy = ViewPolicy.for_input(data.crop_pct, data.hw)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    xs, ys, keys, batch, skipped = [], [], [], [], []

    def flush():
        if batch:
            x = (torch.stack(batch).float() - mean) / std
            xs.append(tap(model, x)[0].float().numpy())
            batch.clear()

    def eval_view(s, height: int, width: int) -> np.ndarray:
        return view_at(policy, s.key, 0, height, width)

    bar = tqdm(total=len(corpus.shards), unit="shard", desc="features", disable=not progress, dynamic_ncols=True)
    for shard in corpus.shards:
        labelled = (s for s in screened(corpus, shard, record_to(skipped)) if s.label is not None)
        for item in view_pixels(labelled, views=eval_view, crops=[Crop(data.hw, data.interpolation)],
                                decode=replace(corpus.options.decode, reduced=False),  # judged as deployed: full-size decodes
                                handler=record_to(skipped)):
            batch.append(item.crops[0][0])
            ys.append(item.sample.label)
            keys.append(item.sample.key)
            if len(batch) == batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    if not xs:
        raise KdcacheError(f"{corpus_spec}: no labelled samples (webdataset 'cls' fields or image-folder classes)")
    return {"x": np.concatenate(xs).astype(np.float32), "y": np.asarray(ys, dtype=np.int64), "keys": keys,
            "skipped_samples": len(skipped)}


def probe_model(which: str, data: str, options: ProbeOptions = ProbeOptions(), *, run: str | None = None,
                ema: bool = False, model: str | None = None, read: ReadOptions | None = None,
                val_data: str | None = None, progress: bool = False) -> dict:
    """``kdcache eval knn|linear --run RUN | --model SPEC``: the probe of a model's live summary
    features; ``val_data``: a given validation corpus instead of the seeded split."""
    net, cfg, what = run_student(run, ema=ema) if which == "run" else spec_model(model)
    f = labelled_model_features(net, cfg, data, read=read, progress=progress)
    val, skipped = None, f["skipped_samples"]
    if val_data:
        v = labelled_model_features(net, cfg, val_data, read=read, progress=progress)
        val, skipped = (v["x"], v["y"]), skipped + v["skipped_samples"]
    r = probe(f["x"], f["y"], f"{what}, live summary features", resolution=list(cfg.hw), options=options, val=val,
              val_name=val_data)
    return {**r, "skipped_samples": skipped}
