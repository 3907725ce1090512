"""Objectives as parts: the losses a run logs step by step are the ones it logged before the
trainer was split into objectives, losses and balancers (recorded by the trainer of commit
``RECORDED_AT`` with ``python tests/train/test_objectives.py --record``), for the defaults (AdamW,
warmup-cosine) and for each way a step weighs its objectives (MGDA, DTO-KD, teacher dropping)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from helpers import metrics_rows, multiteacher_cfg

RECORDED = os.path.join(os.path.dirname(__file__), "data", "losses_before_objectives.json")
STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"
VARIANTS = {  # name -> options beyond the tiny multi-teacher config (two teachers: a ViT and a ResNet)
    "defaults": {},
    "mgda with a task": {"balance": "mgda", "task_loss": "ce"},
    "dto": {"balance": "dto", "task_loss": "ce"},
    "teacher drop, ema": {"teacher_drop": 0.5, "ema": 0.9},
    "static weights, patch loss mix": {"teacher_weights": {"vit": 2.0, "cnn": 0.5}, "alpha": 0.5, "summary_weight": 0.3},
}


def run_variant(store, corpus, out, options) -> list[dict]:
    """Every logged column of every step, as floats (one BLAS thread: bitwise repeatable)."""
    from kdcache.train.fit import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(multiteacher_cfg(store, corpus, out, student=STUDENT, **options), progress=False)
    finally:
        torch.set_num_threads(threads)
    return [{k: float(v) for k, v in row.items() if v != "" and k != "samples_per_s"} for row in metrics_rows(out)]  # (a rate)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_runs_losses_are_those_of_the_trainer_before_objectives_became_parts(two_teachers, corpus, tmp_path, variant):
    with open(RECORDED) as f:
        before = json.load(f)["variants"][variant]
    after = run_variant(two_teachers, corpus, str(tmp_path / "run"), VARIANTS[variant])
    assert len(after) == len(before) > 4
    for step, (a, b) in enumerate(zip(after, before)):
        assert set(a) == set(b), (step, sorted(set(a) ^ set(b)))
        for col in b:
            assert a[col] == pytest.approx(b[col], rel=1e-4, abs=1e-6), (variant, step, col)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:  # the fixtures' store and corpus, built here
    import subprocess
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    import conftest

    from kdcache.data.demo_corpus import build_demo_corpus
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        build_demo_corpus(corpus, digits=16, photos=8, shard_size=8, digit_size=40)  # as conftest.corpus
        vit = conftest._save(conftest.VIT["model"], os.path.join(tmp, "vit.safetensors"), img_size=32, depth=2)
        cnn = conftest._save(conftest.CNN["model"], os.path.join(tmp, "cnn.safetensors"))
        specs = [f"vit={conftest.VIT['model']},pretrained=false,{conftest.VIT['kwargs']},checkpoint={vit}",
                 f"cnn={conftest.CNN['model']},pretrained=false,{conftest.CNN['kwargs']},checkpoint={cnn}"]
        store = os.path.join(tmp, "s.zarr")
        extract(corpus, store, specs, ExtractOptions(views=2, progress=False, workers=0))  # as conftest.two_teachers
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
        runs = {name: run_variant(store, corpus, os.path.join(tmp, f"run{i}"), options)
                for i, (name, options) in enumerate(VARIANTS.items())}
    os.makedirs(os.path.dirname(RECORDED), exist_ok=True)
    with open(RECORDED, "w") as f:
        json.dump({"recorded_at": commit, "variants": runs}, f, indent=1)
    print(f"{RECORDED}: {len(runs)} variants recorded at {commit}")
