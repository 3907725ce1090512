"""Multi-teacher options: MGDA weights, teacher dropping, transformer heads, a shared adapter,
the task loss, all recorded and exactly resumable."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from helpers import metrics_rows, multiteacher_cfg

from kdcache.train.balance import min_norm_weights, teachers_kept
from kdcache.train.config import ConfigError
from kdcache.train.fit import train
from kdcache.train.losses import task_loss

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


def _cfg(store, corpus, out, **kw):
    return multiteacher_cfg(store, corpus, out, **{"student": STUDENT, **kw})


_metrics = metrics_rows


def _gram(g):
    g = torch.as_tensor(np.asarray(g), dtype=torch.float64)
    return g @ g.T, g


def test_mgda_two_gradients_equal_the_closed_form_min_norm_solution():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gram, g = _gram(rng.standard_normal((2, 7)))
        a = min_norm_weights(gram)
        g1, g2 = g[0], g[1]
        gamma = float(torch.clamp((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1))  # weight of g1
        assert a.tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-9)
        grid = np.linspace(0, 1, 2001)  # and no point of the segment is shorter
        norms = [float(torch.linalg.norm(t * g1 + (1 - t) * g2)) for t in grid]
        assert float(torch.linalg.norm(a @ g)) <= min(norms) + 1e-9


@pytest.mark.parametrize("n", [2, 3, 5])
def test_mgda_identical_gradients_get_equal_weights(n):
    gram, _ = _gram(np.tile(np.arange(1.0, 6.0), (n, 1)))
    assert min_norm_weights(gram).tolist() == pytest.approx([1.0 / n] * n, abs=1e-9)


@pytest.mark.parametrize("n", [3, 4, 6])
def test_mgda_direction_opposes_no_gradient_and_is_the_shortest(n):
    rng = np.random.default_rng(n)
    for _ in range(10):
        gram, g = _gram(rng.standard_normal((n, 9)) + rng.standard_normal(9))
        a = min_norm_weights(gram)
        assert float(a.sum()) == pytest.approx(1.0) and float(a.min()) >= 0
        d = a @ g
        assert float((g @ d).min()) >= float(d @ d) - 1e-6 >= -1e-6  # every g_t . d >= |d|^2 >= 0
        for _ in range(200):  # no point of the simplex is shorter
            w = torch.as_tensor(rng.dirichlet(np.ones(n)))
            assert float(torch.linalg.norm(w @ g)) >= float(torch.linalg.norm(d)) - 1e-6


def test_teacher_dropping_keeps_the_max_loss_teacher_every_step():
    rng = np.random.default_rng(0)
    dropped = 0
    for step in range(400):
        losses = dict(zip("abcd", rng.random(4).tolist()))
        kept = teachers_kept(losses, 0.5, seed=3, step=step)
        assert kept[max(losses, key=losses.get)]
        dropped += sum(not v for v in kept.values())
        assert kept == teachers_kept(losses, 0.5, seed=3, step=step)  # the same on every rank and after a resume
    assert dropped / (400 * 3) == pytest.approx(0.5, abs=0.05)
    assert all(teachers_kept({"a": 1.0, "b": 2.0}, 0.0, seed=0, step=1).values())


def test_task_loss_ignores_unlabelled_samples():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([2, -1, 0, -1, 3, 1])
    keep = labels >= 0
    torch.testing.assert_close(task_loss(logits, labels), torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    task_loss(logits, labels).backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.any(logits.grad[keep] != 0)
    logits.grad = None
    none = task_loss(logits, torch.full((6,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.all(logits.grad == 0)


def test_transformer_head_and_shared_adapter_train_and_leave_the_export(tmp_path, two_teachers, corpus):
    from kdcache.train.export import export
    run = str(tmp_path / "run")
    train(_cfg(two_teachers, corpus, run, epochs=4, head="transformer", head_depth=1, head_heads=2, shared_adapter=True),
          progress=False)
    rows = _metrics(run)
    loss = [float(r["loss"]) for r in rows]
    assert np.mean(loss[-4:]) < 0.9 * np.mean(loss[:4])
    heads = safetensors.torch.load_file(os.path.join(run, "checkpoints", "last", "heads.safetensors"))
    assert any(k.startswith("heads.vit.blocks.0.attn") for k in heads) and any(k.startswith("heads.cnn.blocks") for k in heads)
    assert any(k.startswith("adapter.") for k in heads)
    res = export(run)
    sd = safetensors.torch.load_file(res["student"])
    assert not any(k.startswith(("heads.", "adapter.", "task_head.")) for k in sd)
    scope = {"timm": timm}
    exec(f"m = {res['load_with']}", scope)
    assert sorted(scope["m"].state_dict()) == sorted(sd)


def test_mgda_and_task_loss_are_logged_and_recorded(tmp_path, two_teachers, corpus):
    run = str(tmp_path / "run")
    train(_cfg(two_teachers, corpus, run, balance="mgda", task_loss="ce"), progress=False)
    rows = _metrics(run)
    for r in rows:
        w = [float(r["weight/vit"]), float(r["weight/cnn"]), float(r["weight/task"])]
        assert sum(w) == pytest.approx(3.0, abs=1e-6) and min(w) >= 0  # n x the simplex
        assert float(r["task"]) > 0
    assert len({r["weight/vit"] for r in rows}) > 1  # chosen per step
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["balance"]["method"] == "mgda" and cfg["objectives"]["task_loss"] == "ce"
    from kdcache.eval.report import report  # the report shows the weights over time
    text = open(report(run, knn=False)["report"]).read()
    assert "| objective | mean weight | first | last |" in text and "| task |" in text and "| cnn |" in text
    method = json.load(open(os.path.join(run, "provenance.json")))["method"]
    assert method["balance"] == "mgda" and method["task_classes"] == 12 and method["teachers"] == ["vit", "cnn"]
    heads = safetensors.torch.load_file(os.path.join(run, "checkpoints", "last", "heads.safetensors"))
    assert heads["task_head.weight"].shape[0] == 12  # the corpus's 12 classes, found in its labels


def test_teacher_drop_zeroes_dropped_teachers_and_keeps_the_worst(tmp_path, two_teachers, corpus):
    run = str(tmp_path / "run")
    train(_cfg(two_teachers, corpus, run, teacher_drop=0.5), progress=False)
    rows = _metrics(run)
    dropped = 0
    for r in rows:
        w = {t: float(r[f"weight/{t}"]) for t in ("vit", "cnn")}
        assert set(w.values()) <= {0.0, 1.0} and max(w.values()) == 1.0
        dropped += list(w.values()).count(0.0)
    assert 0 < dropped < len(rows)


@pytest.mark.parametrize("options", [
    dict(balance="mgda", task_loss="ce", teacher_drop=0.5),
    dict(head="transformer", head_depth=1, head_heads=2, shared_adapter=True, task_loss="ce", task_weight=0.5),
])
def test_resume_is_exact_with_every_option(tmp_path, two_teachers, corpus, options):
    train(_cfg(two_teachers, corpus, tmp_path / "full", **options), progress=False)
    train(_cfg(two_teachers, corpus, tmp_path / "split", stop_at_step=4, **options), progress=False)
    train(_cfg(two_teachers, corpus, tmp_path / "split", resume=True, **options), progress=False)
    for f in ("student.safetensors", "heads.safetensors"):
        a = safetensors.torch.load_file(str(tmp_path / "full" / "checkpoints" / "last" / f))
        b = safetensors.torch.load_file(str(tmp_path / "split" / "checkpoints" / "last" / f))
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _metrics(str(tmp_path / "full")) [-1]["loss"] == _metrics(str(tmp_path / "split"))[-1]["loss"]


def test_options_are_validated(tmp_path, corpus):
    for kw, msg in [(dict(head="attention"), "--head 'attention'"), (dict(balance="pcgrad"), "--balance 'pcgrad'"),
                    (dict(teacher_drop=1.0), r"--teacher-drop 1.0: expected a number in \[0, 1\)"),
                    (dict(head="transformer", head_hidden=30, head_heads=4), "a multiple of --head-heads 4"),
                    (dict(task_loss="mse"), "--task-loss 'mse'")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg("s.zarr", corpus, tmp_path / "r", **kw)
