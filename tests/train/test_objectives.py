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


def test_a_loss_registered_by_name_is_what_the_objective_pays():
    """Adding a loss is a function registered in train.losses: --patch-loss NAME then uses it
    (here against F.mse_loss computed directly); an unknown name is one line naming the option."""
    import torch.nn.functional as F

    from kdcache.errors import KdcacheError
    from kdcache.train import losses
    from kdcache.train.objectives import Features, StepOutputs

    @losses.feature_loss("test-mse")
    def mse(pred, target, spec):
        return F.mse_loss(pred.float(), target.float())
    try:
        g = torch.Generator().manual_seed(0)
        pred = (torch.randn(3, 192, generator=g), torch.randn(3, 4, 192, generator=g))
        target = {"summary": torch.randn(3, 192, generator=g), "patch": torch.randn(3, 4, 192, generator=g)}
        spec = losses.LossSpec(summary_weight=0.5, patch_weight=2.0)
        step = StepOutputs({"vit": pred}, {"vit": target}, None, None, None)
        value, parts = Features("vit", 1.0, spec, summary_loss="cosine", patch_loss="test-mse").loss(step)
        want_patch = F.mse_loss(pred[1], target["patch"])
        want_summary = (1 - F.cosine_similarity(pred[0], target["summary"], dim=-1)).mean()
        assert parts["vit/patch"] == pytest.approx(float(want_patch), rel=1e-6)
        assert float(value) == pytest.approx(float(0.5 * want_summary + 2.0 * want_patch), rel=1e-6)
        with pytest.raises(KdcacheError, match="--patch-loss 'nope': expected one of cosine, cos-smoothl1, codes-ce"):
            Features("vit", 1.0, spec, patch_loss="nope").loss(step)
    finally:
        del losses.LOSSES["test-mse"]


def test_timms_optimizer_and_schedule_by_name(two_teachers, corpus, tmp_path, monkeypatch, capsys):
    """--opt and --sched build timm's optimizer and schedule (counted in steps): SGD with momentum,
    the step schedule's rate at every logged step equal to timm's StepLRScheduler run directly;
    an unknown optimizer is one line."""
    from timm.scheduler import StepLRScheduler
    from helpers import cli_call, one_error_line

    from kdcache.train.fit import build_run
    run = build_run(multiteacher_cfg(two_teachers, corpus, tmp_path / "b", student=STUDENT, opt="sgd", momentum=0.8,
                                     sched="step", warmup_steps=2, decay_steps=3, decay_rate=0.5), progress=False)
    assert type(run.trainer.optimizer).__name__ == "SGD" and run.trainer.optimizer.defaults["momentum"] == 0.8
    rows = run_variant(two_teachers, corpus, str(tmp_path / "run"),
                       {"opt": "sgd", "momentum": 0.8, "sched": "step", "warmup_steps": 2, "decay_steps": 3,
                        "decay_rate": 0.5})
    reference = StepLRScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3), decay_t=3, decay_rate=0.5,
                                warmup_t=2, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    for r in rows:  # a row is logged after its step (1-based): the rate the next step uses
        reference.step_update(num_updates=int(r["step"]))
        assert r["lr"] == pytest.approx(reference.optimizer.param_groups[0]["lr"], rel=1e-6), r["step"]
    assert len({round(r["lr"], 9) for r in rows}) > 2
    code, _, err = cli_call(monkeypatch, capsys, "train", "--store", two_teachers, "--data", corpus, "--student", STUDENT,
                            "--out", str(tmp_path / "bad"), "--opt", "adamww", "--workers", "0", "--no-progress")
    assert code == 2 and "--opt 'adamww': not a timm optimizer" in one_error_line(err)
