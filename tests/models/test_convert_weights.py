"""models.convert_weights: the shipped EfficientNet-Lite0 weights become a timm checkpoint that classifies
real photos correctly; anything that does not fit tensor by tensor is refused."""
from __future__ import annotations

import pytest
import timm
import timm.data
import torch
from PIL import Image

from kdcache.models.spec import ModelSpecError

from kdcache.models.teacher import create_teacher
from kdcache.models.convert_weights import convert_by_order, convert_known

ESPRESSO, CATS = 967, {281, 282, 283, 284, 285}  # ImageNet: espresso; tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    return convert_known("efficientnet-lite0", str(tmp_path_factory.mktemp("w") / "lite0.safetensors"))


def test_converted_efficientnet_lite0_classifies_scikit_image_photos(lite0):
    import skimage.data
    m = timm.create_model("tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay=dict(file=lite0["checkpoint"])).eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=m))
    x = torch.stack([tf(Image.fromarray(skimage.data.coffee())), tf(Image.fromarray(skimage.data.chelsea()))])
    with torch.no_grad():
        top = m(x).argmax(1).tolist()
    assert top[0] == ESPRESSO and top[1] in CATS, top
    assert lite0["tensors"] == 296


def test_it_loads_as_a_kdcache_teacher_whose_features_are_timms(lite0):
    t = create_teacher(f"effnet=tf_efficientnet_lite0,checkpoint={lite0['checkpoint']}")
    assert (t.meta.dim, t.meta.grid, t.meta.input_size) == (1280, (7, 7), (3, 224, 224))
    x = torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8)
    summary, patches = t.features(x)
    assert summary.shape == (1, 1280) and patches.shape == (1, 49, 1280) and torch.isfinite(patches).all()


def test_a_tensor_that_does_not_fit_is_refused_by_position_shape_and_role():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    names = list(model.state_dict())
    src = {f"other_{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(model.state_dict().items())}
    assert list(convert_by_order(src, model, what="ok")) == names
    keys = list(src)
    bad = dict(src)
    bad[keys[5]] = torch.zeros(3)
    with pytest.raises(ModelSpecError, match=r"tensor 5 other_5.num_batches_tracked has shape \(3,\)"):
        convert_by_order(bad, model, what="bad")
    with pytest.raises(ModelSpecError, match="295 tensors"):
        convert_by_order(dict(list(src.items())[:-1]), model, what="short")
    renamed = {(k.replace(".weight", ".bias") if k == keys[1] else k): v for k, v in src.items()}  # same shape, other role
    with pytest.raises(ModelSpecError, match="tensor 1 other_1.bias is a bias"):
        convert_by_order(renamed, model, what="role")
