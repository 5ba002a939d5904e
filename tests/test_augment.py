"""The albumentations training policy: which operations it holds and how `augment.strength` scales them."""
import albumentations as A
import numpy as np
import pytest

from wbc.core.config import load_config
from wbc.s1_data.augment import build_transform
from wbc.s1_data.damage import DamageTransform


def _ops(*overrides):
    return {type(op).__name__: op for op in build_transform(load_config(None, list(overrides)), True).transforms}


@pytest.mark.parametrize("s", [1.0, 0.5])
def test_policy_holds_geometry_colour_and_damage_scaled_by_strength(s):
    ops = _ops(f"augment.strength={s}")
    assert list(ops) == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "Affine", "OneOf", "DamageTransform"]
    # base.yaml: flip 0.5, rot90 0.5, affine p 0.5 / scale [0.9, 1.1] / translate 0.06, colour p 0.6, damage p 0.5
    for name, p in [("HorizontalFlip", 0.5), ("VerticalFlip", 0.5), ("RandomRotate90", 0.5), ("Affine", 0.5),
                    ("OneOf", 0.6), ("DamageTransform", 0.5)]:
        assert ops[name].p == pytest.approx(p * s), name
    af = ops["Affine"]
    assert af.scale["x"] == pytest.approx((1 - 0.1 * s, 1 + 0.1 * s))
    assert af.translate_percent["x"] == pytest.approx((-0.06 * s, 0.06 * s))
    hsv, bc = ops["OneOf"].transforms
    assert isinstance(hsv, A.HueSaturationValue) and hsv.hue_shift_limit == pytest.approx((-6 * s, 6 * s))
    assert isinstance(bc, A.RandomBrightnessContrast) and bc.brightness_limit == pytest.approx((-0.15 * s, 0.15 * s))
    assert isinstance(ops["DamageTransform"], DamageTransform)


def test_probabilities_are_capped_and_switches_remove_operations():
    assert _ops("augment.strength=4")["HorizontalFlip"].p == 1.0
    ops = _ops("augment.rot90=0", "augment.color.p=0", "augment.damage.p=0")
    assert set(ops) == {"HorizontalFlip", "VerticalFlip", "Affine"}


def test_flips_act_on_pixels_and_evaluation_is_unaugmented():
    cfg = load_config(None, ["augment.flip=1.0", "augment.rot90=0", "augment.affine.p=0", "augment.color.p=0",
                             "augment.damage.p=0"])
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(build_transform(cfg, True)(image=img)["image"], img[::-1, ::-1])
    assert build_transform(cfg, False) is None  # TTA views are applied on the device


def test_another_labs_stain_light_and_camera_are_off_by_default_and_switched_on_one_by_one():
    lab = ["augment.lab.stain_p=0.5", "augment.lab.gray_p=0.2", "augment.lab.gamma_p=0.3",
           "augment.lab.illuminant_p=0.4"]
    ops = _ops(*lab, "augment.damage.p=0")
    assert list(ops) == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "Affine", "HEStain", "PlanckianJitter",
                         "RandomGamma", "ToGray", "OneOf"]
    assert (ops["HEStain"].p, ops["ToGray"].p, ops["RandomGamma"].p, ops["PlanckianJitter"].p) == (0.5, 0.2, 0.3, 0.4)
    assert ops["HEStain"].intensity_scale_range == (0.7, 1.3)
    t = build_transform(load_config(None, ["augment.lab.stain_p=1.0", "augment.lab.gray_p=1.0", "augment.flip=0",
                                           "augment.rot90=0", "augment.affine.p=0", "augment.color.p=0",
                                           "augment.damage.p=0"]), True)
    t.set_random_seed(0)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = t(image=img)["image"]
    assert out.shape == img.shape and np.array_equal(out[..., 0], out[..., 1])  # grey last
