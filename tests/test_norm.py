"""`model.norm`: BatchNorm swapped for per-image GroupNorm, which divides a camera's gain out."""
import pytest
import timm
import torch
from torch import nn

from wbc.core.errors import WBCError
from wbc.models.factory import create_model
from wbc.optional.norm import groups_for


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]


def test_groups_divide_every_width():
    assert [groups_for(c, 8) for c in (16, 24, 40, 112, 6, 7, 3)] == [8, 8, 8, 8, 6, 7, 3]


@pytest.mark.parametrize("kind,groups", [("group", 8), ("layer", 1)])
def test_every_batchnorm_replaced_with_its_scale_and_shift(tmp_path, kind, groups):
    ref = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    with torch.no_grad():
        for m in _norms(ref):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    cfg = {"arch": "tf_efficientnet_lite0", "pretrained_file": str(tmp_path / "w.pth"), "norm": kind,
           "norm_groups": 8}
    model = create_model(cfg, num_classes=5)
    old, new = _norms(ref), _norms(model)
    assert len(new) == len(old) == 49 and all(type(m).__name__ == "GroupNormAct" for m in new)
    assert all(m.num_groups == groups_for(m.num_channels, groups) for m in new)
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) for a, b in zip(old, new))
    assert type(model.bn1.act).__name__ == "ReLU6"  # the activation timm fuses into the norm layer is kept
    # what training saves is what prediction rebuilds: a plain state_dict into a model made from the same config
    again = create_model({**cfg, "pretrained_file": None}, num_classes=5)
    again.load_state_dict(model.state_dict())


def test_a_camera_gain_is_divided_out_by_groupnorm_not_by_batchnorm():
    x = torch.rand(4, 3, 64, 64) - 0.5
    y = 0.5 * x  # another camera's gain: half the contrast
    outs = {}
    for kind in (None, "group"):
        torch.manual_seed(0)
        m = create_model({"arch": "tf_efficientnet_lite0", "norm": kind, "norm_groups": 8}, num_classes=5).eval()
        with torch.no_grad():
            f, g = m.forward_features(x), m.forward_features(y)
        outs[kind] = ((f - g).norm() / f.norm()).item()
    assert outs["group"] < 0.01 < 0.3 < outs[None]


def test_unknown_kind_and_a_model_without_batchnorm_are_refused():
    with pytest.raises(WBCError, match="model.norm: 'instance'"):
        create_model({"arch": "test_resnet", "norm": "instance", "norm_groups": 8}, num_classes=3)
    with pytest.raises(WBCError, match="no BatchNorm"):
        create_model({"arch": "test_vit", "norm": "group", "norm_groups": 8}, num_classes=3)
