"""Multi-teacher methods: the model token across teacher spaces, a frozen backbone
with adapters, the UNIC ladder, DTO-KD's trade-off; each resumable, each exporting a timm student."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from helpers import metrics_rows, multiteacher_cfg

from kdcache.train.balance import dto_weights
from kdcache.train.config import ConfigError
from kdcache.train.export import export
from kdcache.train.fit import build_run, train
from kdcache.train.spaces import ModelTokenSpaces

STUDENT = "vit_tiny_patch16_224,img_size=32,depth=2"


@pytest.fixture(scope="module")
def pretrained_student(tmp_path_factory):
    """A 'pretrained' student backbone: fixed weights in a checkpoint, no classifier."""
    torch.manual_seed(7)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    path = str(tmp_path_factory.mktemp("student") / "backbone.safetensors")
    safetensors.torch.save_file(m.state_dict(), path)
    return f"{STUDENT},checkpoint={path}", path


def _cfg(store, corpus, out, **kw):
    return multiteacher_cfg(store, corpus, out, **{"student": STUDENT, **kw})


_metrics = metrics_rows


def _ckpt(run, name):
    return safetensors.torch.load_file(os.path.join(run, "checkpoints", "last", name))


def _load_export(run):
    res = export(run)
    scope = {"timm": timm}
    exec(f"m = {res['load_with']}", scope)
    return scope["m"].eval(), res


# -- the model token across teacher spaces -----------------------------------------------------

def test_model_tokens_one_per_space_and_spaces_meet_only_through_them():
    torch.manual_seed(0)
    spaces = ModelTokenSpaces(24, 24, 4, {"a": (8, 10), "b": (6, 5), "c": (4, 3)}, width=16, depth=2, heads=2).eval()
    assert tuple(spaces.model_tokens.shape) == (3, 16)  # one learnable token per teacher space
    s, p = torch.randn(2, 24), torch.randn(2, 4, 24)
    with torch.no_grad():
        before, alone = spaces(s, p), spaces(s, p, exchange=False)
        spaces.embed_patch["a"].weight.add_(0.5 * torch.randn_like(spaces.embed_patch["a"].weight))  # only a's projection
        after, alone_after = spaces(s, p), spaces(s, p, exchange=False)
    assert {t: (v[0].shape, v[1].shape) for t, v in after.items()} == {
        "a": ((2, 8), (2, 4, 10)), "b": ((2, 6), (2, 4, 5)), "c": ((2, 4), (2, 4, 3))}
    assert not torch.allclose(after["a"][1], before["a"][1])
    for t in ("b", "c"):  # the other spaces change, through the model tokens' exchange ...
        assert (after[t][0] - before[t][0]).abs().max() > 1e-4 and (after[t][1] - before[t][1]).abs().max() > 1e-4
        for i in (0, 1):  # ... and only through it: without the inter-space modules, not at all
            assert torch.equal(alone[t][i], alone_after[t][i])


def test_model_token_head_trains_resumes_and_leaves_the_export(tmp_path, two_teachers, corpus):
    opts = dict(head="model-token", head_depth=1, head_heads=2)
    _resumes_exactly(tmp_path, two_teachers, corpus, opts)
    heads = _ckpt(str(tmp_path / "full"), "heads.safetensors")
    assert heads["spaces.model_tokens"].shape == (2, 32) and any(k.startswith("spaces.inter.0.") for k in heads)
    loss = [float(r["loss"]) for r in _metrics(str(tmp_path / "full"))]
    assert np.mean(loss[-3:]) < np.mean(loss[:3])
    m, res = _load_export(str(tmp_path / "full"))
    assert sorted(m.state_dict()) == sorted(safetensors.torch.load_file(res["student"]))


# -- a frozen backbone and its adapters -------------------------------------------------------

def test_frozen_backbone_is_bit_identical_while_adapters_learn_and_fold_into_the_export(tmp_path, two_teachers, corpus,
                                                                                        pretrained_student):
    spec, path = pretrained_student
    run = str(tmp_path / "run")
    train(_cfg(two_teachers, corpus, run, student=spec, frozen_backbone=True, adapter_rank=4, shared_adapter=True,
               normalize="phi-s", epochs=3), progress=False)
    original = safetensors.torch.load_file(path)
    backbone = _ckpt(run, "backbone.safetensors")
    assert sorted(backbone) == sorted(original)
    for k in original:  # the frozen backbone: every weight and batch statistic bit for bit
        assert torch.equal(backbone[k], original[k]), k
    heads = _ckpt(run, "heads.safetensors")
    ups = {k: v for k, v in heads.items() if k.startswith("backbone_adapters.") and k.endswith(".up")}
    assert len(ups) >= 8 and all(float(v.abs().max()) > 0 for v in ups.values())  # every adapter learnt (from zero)
    assert "backbone_adapters.blocks__0__attn__qkv.up" in ups
    # the export is the backbone with the adapters folded in: timm alone reproduces the adapted student
    m, res = _load_export(run)
    built = build_run(_cfg(two_teachers, corpus, run, student=spec, frozen_backbone=True, adapter_rank=4,
                           shared_adapter=True, normalize="phi-s", epochs=3), evaluate=True, progress=False)
    distill = built.trainer.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(x), distill.student.forward_features(x), rtol=1e-4, atol=1e-4)
        plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2).eval()
        plain.load_state_dict(original)
        assert (m.forward_features(x) - plain.forward_features(x)).abs().max() > 1e-3  # and it is not the backbone
    exported = safetensors.torch.load_file(res["student"])
    assert sorted(exported) == sorted(original)  # only the student: no adapter, no head


def test_frozen_backbone_resumes_exactly(tmp_path, two_teachers, corpus, pretrained_student):
    _resumes_exactly(tmp_path, two_teachers, corpus, dict(student=pretrained_student[0], frozen_backbone=True,
                                                          adapter_rank=2), files=("student.safetensors",
                                                                                  "heads.safetensors", "backbone.safetensors"))


def test_frozen_backbone_folds_adapters_of_pointwise_convolutions():
    from kdcache.train.adapters import attach_adapters, merged_state
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    adapters = attach_adapters(net, 3)
    assert "conv_head" in adapters and not any(p.requires_grad for p in net.parameters())
    for a in adapters.values():
        torch.nn.init.normal_(a.up, std=0.02)
    x = torch.randn(2, 3, 64, 64)
    clean = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    clean.load_state_dict(merged_state(net, adapters))
    with torch.no_grad():
        torch.testing.assert_close(clean(x), net(x), rtol=1e-4, atol=1e-4)


# -- the ladder ----------------------------------------------------------------------------------

def test_ladder_reads_the_depths_asked_for_and_trains(tmp_path, two_teachers, corpus):
    opts = dict(ladder=(0, -1))
    _resumes_exactly(tmp_path, two_teachers, corpus, opts)
    run = str(tmp_path / "full")
    built = build_run(_cfg(two_teachers, corpus, run, **opts), evaluate=True, progress=False)
    model = built.trainer.model.eval()
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        model(x)
        norm = (x.float() - model.mean) / model.std
        _, direct = model.student.forward_intermediates(norm, indices=[0, -1])
    assert len(model.ladder_inputs) == 2
    for got, want in zip(model.ladder_inputs, direct):
        torch.testing.assert_close(got, want)
    heads = _ckpt(run, "heads.safetensors")
    assert float(heads["ladder.rungs.vit.0.patch.weight"].abs().max()) > 0  # started at zero, learnt
    assert heads["ladder.rungs.cnn.1.summary.weight"].shape == (512, 192)
    m, _ = _load_export(run)
    assert not any(k.startswith("ladder") for k in m.state_dict())


def test_ladder_refuses_a_depth_the_student_does_not_have(tmp_path, two_teachers, corpus):
    from kdcache.errors import KdcacheError
    with pytest.raises(KdcacheError, match="--ladder 7: VisionTransformer refuses these depths"):
        build_run(_cfg(two_teachers, corpus, tmp_path / "r", ladder=(7,)), progress=False)
    with pytest.raises(KdcacheError, match="name 1 distinct depth"):  # -2 is 0 in a 2-block ViT
        build_run(_cfg(two_teachers, corpus, tmp_path / "r", ladder=(0, -2)), progress=False)


# -- DTO-KD ------------------------------------------------------------------------------------

def test_dto_weight_equals_the_closed_form_on_two_known_gradients():
    g_task, g_kd = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([-1.0, 1.0, 0.0])  # |5|, |sqrt 2|, conflicting
    gram = torch.stack([g_task, g_kd]) @ torch.stack([g_task, g_kd]).T
    a_task, a_kd, cos = dto_weights(gram)
    assert a_task == pytest.approx(2 ** 0.5 / (5 + 2 ** 0.5)) and a_kd == pytest.approx(5 / (5 + 2 ** 0.5))
    assert cos == pytest.approx(-3 / (5 * 2 ** 0.5))
    d = a_task * g_task + a_kd * g_kd
    assert float(d @ g_task) >= 0 and float(d @ g_kd) >= 0  # opposes neither
    assert float(a_task * g_task.norm()) == pytest.approx(float(a_kd * g_kd.norm()))  # neither dominates
    rng = np.random.default_rng(1)
    for _ in range(50):  # the bisector of the unit gradients: the min-norm point of their hull
        g = torch.as_tensor(rng.standard_normal((2, 6)))
        a_t, a_k, _ = dto_weights(g @ g.T)
        u = g / g.norm(dim=1, keepdim=True)
        d = a_t * g[0] + a_k * g[1]
        torch.testing.assert_close(d / d.norm(), (u[0] + u[1]) / (u[0] + u[1]).norm())
    assert dto_weights(torch.zeros(2, 2)) == (0.5, 0.5, 0.0)
    assert dto_weights(torch.tensor([[0.0, 0.0], [0.0, 4.0]]))[:2] == (0.0, 1.0)  # no labels in the batch: all distillation


def test_dto_weights_are_logged_every_step_and_resume_exactly(tmp_path, two_teachers, corpus):
    _resumes_exactly(tmp_path, two_teachers, corpus, dict(balance="dto", task_loss="ce", teacher_weights={"cnn": 0.5}))
    rows = _metrics(str(tmp_path / "full"))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 4  # every step (log_every=1)
    for r in rows:
        w_task, w_vit, w_cnn = float(r["weight/task"]), float(r["weight/vit"]), float(r["weight/cnn"])
        assert w_task / 2 + w_vit / 2 == pytest.approx(1.0, abs=1e-6)  # alpha_task + alpha_distill = 1
        assert w_cnn == pytest.approx(0.5 * w_vit, rel=1e-6)  # the static weights within distillation
        assert -1.0 <= float(r["dto/cos"]) <= 1.0
    assert len({r["weight/task"] for r in rows}) > 1
    from kdcache.eval.report import report
    text = open(report(str(tmp_path / "full"), knn=False)["report"]).read()
    assert "| task |" in text


def test_model_token_adapter_and_ladder_options_are_validated(tmp_path, corpus):
    for kw, msg in [(dict(balance="dto"), "--balance dto weighs the task loss"),
                    (dict(balance="dto", task_loss="ce", logits_loss="kl", label_loss="ce"), "drop it"),
                    (dict(head="model-token", shared_adapter=True), "drop --shared-adapter"),
                    (dict(head="model-token", head_hidden=30, head_heads=4), "a multiple of --head-heads 4"),
                    (dict(frozen_backbone=True), "a frozen random backbone learns nothing"),
                    (dict(frozen_backbone=True, student=STUDENT + ",pretrained=true", ema=0.9), "drop --ema"),
                    (dict(ladder=(1, 1)), "--ladder"), (dict(adapter_rank=0), "--adapter-rank 0")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg("s.zarr", corpus, tmp_path / "r", **kw)


def _resumes_exactly(tmp_path, store, corpus, options, files=("student.safetensors", "heads.safetensors")):
    """Trained in one go, or stopped at step 4 and resumed: bit-identical checkpoints and losses."""
    train(_cfg(store, corpus, tmp_path / "full", **options), progress=False)
    train(_cfg(store, corpus, tmp_path / "split", stop_at_step=4, **options), progress=False)
    train(_cfg(store, corpus, tmp_path / "split", resume=True, **options), progress=False)
    for f in files:
        a, b = _ckpt(str(tmp_path / "full"), f), _ckpt(str(tmp_path / "split"), f)
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in _metrics(str(tmp_path / "full"))] == [r["loss"] for r in _metrics(str(tmp_path / "split"))]
    with open(os.path.join(tmp_path, "full", "provenance.json")) as f:
        method = json.load(f)["method"]
    for k, v in options.items():
        if k in method:
            assert method[k] == (list(v) if isinstance(v, tuple) else v), k
