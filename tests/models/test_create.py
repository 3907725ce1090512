"""models: teachers and students built from specs load weights the way timm users expect."""
from __future__ import annotations

import safetensors.torch
import timm
import torch

import pytest

from kdcache.models.spec import ModelSpecError

from kdcache.models.student import create_student

from kdcache.models.teacher import create_teacher


def _save(tmp_path, name, state):
    path = str(tmp_path / name)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_a_backbone_checkpoint_without_classifier_loads_as_a_teacher(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    path = _save(tmp_path, "backbone.safetensors", ref.state_dict())  # no fc.*: what kdcache export writes
    t = create_teacher(f"r=resnet18,img_size=32,checkpoint={path}")
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    summary, patches = t.features(x)
    xn = (x.float() / 255 - torch.tensor(t.data.mean).view(1, 3, 1, 1)) / torch.tensor(t.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        f = ref.forward_features(xn)
    torch.testing.assert_close(summary, ref.forward_head(f, pre_logits=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches, f.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_that_does_not_fit_is_refused_naming_a_key(tmp_path):
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    del state["layer1.0.conv1.weight"]
    path = _save(tmp_path, "broken.safetensors", state)
    with pytest.raises(ModelSpecError, match=r"does not fit resnet18: 3 key\(s\), first: missing layer1.0.conv1.weight"):
        create_teacher(f"r=resnet18,checkpoint={path}")


def test_img_size_is_dropped_for_models_that_do_not_take_it_and_the_data_config_is_typed():
    s = create_student("resnet18,img_size=48")
    assert "img_size" not in s.kwargs and s.kwargs["num_classes"] == 0 and s.data.hw == (48, 48)
    v = create_student("vit_tiny_patch16_224,img_size=32,depth=1")
    assert v.kwargs == {"img_size": 32, "depth": 1, "num_classes": 0} and v.data.input_size == (3, 32, 32)
