"""Summary features of a model run live on a labelled corpus: a trained student (or its EMA), or
any timm model (a teacher, a random-init baseline).

Each image passes through the same walk as extraction (``data.walk.screen``), is decoded with
the same limits, cut to its eval view (the centred ``crop_pct`` box, view 0 of a store) and
resized to the model's input, then normalised with the model's own data config; the feature is
the model's summary vector (``models.taps``: ``forward_head(..., pre_logits=True)``).
"""
from __future__ import annotations

import json
import os

import numpy as np
import safetensors.torch
import timm
import torch

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.decode import BadImage, decode_sample
from kdcache.data.views import replay_view, sample_views
from kdcache.data.walk import Skip, screen
from kdcache.models import DataConfig, ModelSpec, create_student, probe, resolve_data_config
from kdcache.store import KdcacheError, ViewPolicy


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
                            batch_size: int = 32) -> dict:
    corpus = resolve_corpus(corpus_spec, read)
    tap = probe(model, data.hw)
    policy = ViewPolicy(views=1, crop_pct=data.crop_pct, aspect=data.hw[0] / data.hw[1])
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    xs, ys, keys, batch, labels = [], [], [], [], []

    def flush():
        if batch:
            x = (torch.stack(batch).float() - mean) / std
            xs.append(tap(model, x)[0].float().numpy())
            ys.extend(labels)
            batch.clear()
            labels.clear()

    for shard in corpus.shards:
        for s in screen(corpus.samples(shard)):
            if isinstance(s, Skip) or s.label is None:
                continue
            try:
                rgb = decode_sample(s, corpus.options.decode)
            except BadImage:
                continue
            view = sample_views(policy, s.key, *rgb.shape[:2])[0]
            batch.append(replay_view(torch.from_numpy(rgb).permute(2, 0, 1), view, data.hw, data.interpolation))
            labels.append(s.label)
            keys.append(s.key)
            if len(batch) == batch_size:
                flush()
    flush()
    if not xs:
        raise KdcacheError(f"{corpus_spec}: no labelled samples (webdataset 'cls' fields or image-folder classes)")
    return {"x": np.concatenate(xs).astype(np.float32), "y": np.asarray(ys, dtype=np.int64), "keys": keys}


def knn_on_model(which: str, data: str, *, run: str | None = None, ema: bool = False, model: str | None = None,
                 read: ReadOptions | None = None, val_data: str | None = None, **knn) -> dict:
    """``kdcache eval knn --run RUN | --model SPEC``: kNN of a model's live summary features;
    ``val_data``: a given validation corpus instead of the seeded split."""
    from .store_features import knn_report
    net, cfg, what = run_student(run, ema=ema) if which == "run" else spec_model(model)
    f = labelled_model_features(net, cfg, data, read=read)
    val = None
    if val_data:
        v = labelled_model_features(net, cfg, val_data, read=read)
        val = (v["x"], v["y"])
    return knn_report(f["x"], f["y"], f"{what}, live summary features", resolution=list(cfg.hw), val=val, val_name=val_data,
                      **knn)
