"""models.spec: teacher and student specs, validated before anything is built."""
from __future__ import annotations

import pytest

from kdcache.models.spec import ModelSpec, ModelSpecError


def test_teacher_spec_parses_kdcache_keys_preprocessing_and_timm_kwargs():
    s = ModelSpec.parse_teacher("dino=vit_small_patch14_dinov2.lvd142m,img_size=224,mean=0.1:0.2:0.3,interpolation=bilinear,"
                                "crop_pct=0.9,drop_path_rate=0.1,checkpoint=/w/x.safetensors,pretrained=false")
    assert (s.name, s.model, s.pretrained, s.checkpoint, s.img_size) == ("dino", "vit_small_patch14_dinov2.lvd142m", False,
                                                                         "/w/x.safetensors", 224)
    assert s.preprocess == {"mean": (0.1, 0.2, 0.3), "interpolation": "bilinear", "crop_pct": 0.9}
    assert s.timm_kwargs == {"drop_path_rate": 0.1, "img_size": 224}


def test_student_spec_defaults_to_random_init():
    s = ModelSpec.parse_student("resnet18,img_size=64")
    assert (s.name, s.model, s.pretrained, s.img_size) == ("student", "resnet18", False, 64)


@pytest.mark.parametrize("text,match", [
    ("resnet18", "expected NAME=MODEL"), ("t=", "expected NAME=MODEL"), ("=resnet18", "expected NAME=MODEL"), ("", "empty"),
    ("t=resnet18,mean=1:2", "mean must be three numbers"), ("t=resnet18,std=1:0:1", "std must be three numbers"),
    ("t=resnet18,img_size=0", "img_size must be a positive integer"), ("t=resnet18,img_size=big", "img_size must be"),
    ("t=resnet18,interpolation=cubic", "interpolation must be one of"), ("t=resnet18,crop_pct=2", "crop_pct must be"),
    ("t=resnet18,pretrained=maybe", "pretrained must be true or false"), ("t=resnet18,depth", "is not key=value"),
    ("../x=resnet18", "NAME must be"), ("shards=resnet18", "NAME must be"),
])
def test_bad_teacher_specs_are_one_line_errors(text, match):
    with pytest.raises(ModelSpecError, match=match):
        ModelSpec.parse_teacher(text)


def test_student_spec_with_a_name_is_refused():
    with pytest.raises(ModelSpecError, match="no NAME="):
        ModelSpec.parse_student("s=resnet18")
