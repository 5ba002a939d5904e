"""Random background: another lab's plasma and red cells around an untouched cell; off by default."""
import cv2
import numpy as np
import pytest

from wbc.core.config import load_config
from wbc.optional.background import RandomBackground, replace_background
from wbc.s1_data.augment import build_transform
from wbc.s1_data.sample import draw_cell

ONLY = ["augment.flip=0", "augment.rot90=0", "augment.affine.p=0", "augment.color.p=0", "augment.damage.p=0"]


def _regions(drawn, px=4):
    """Pixels well inside the drawn cell, and background pixels well away from it."""
    k = np.ones((2 * px + 1,) * 2, np.uint8)
    inner = cv2.erode(drawn.cell_mask.astype(np.uint8), k) > 0
    outer = cv2.dilate(drawn.cell_mask.astype(np.uint8), k) == 0
    return inner, outer


@pytest.mark.parametrize("label", ["SNE", "LY", "MO"])
def test_the_cell_is_kept_and_the_background_recoloured(label):
    drawn = draw_cell(label, np.random.default_rng(3), 128)
    inner, outer = _regions(drawn)
    out, ok = replace_background(drawn.image, np.random.default_rng(0), shift=20.0, texture=(0.0, 1.3), margin=0.03)
    assert ok
    diff = np.abs(out.astype(int) - drawn.image.astype(int))
    assert diff[inner].max() <= 1  # the cell as it was
    moved = np.abs(out[outer].astype(float).mean(0) - drawn.image[outer].astype(float).mean(0))
    assert moved.max() > 3  # the background's colour moved


def test_texture_zero_flattens_the_red_cells_and_one_keeps_them():
    drawn = draw_cell("LY", np.random.default_rng(5), 128)
    _, outer = _regions(drawn)
    flat, _ = replace_background(drawn.image, np.random.default_rng(1), shift=0.0, texture=(0.0, 0.0), margin=0.03)
    same, _ = replace_background(drawn.image, np.random.default_rng(1), shift=0.0, texture=(1.0, 1.0), margin=0.03)
    assert drawn.image[outer].std(0).max() > 8  # red cells on plasma
    assert flat[outer].std(0).max() < 2  # plasma only
    assert np.abs(same.astype(int) - drawn.image.astype(int))[outer].max() <= 3  # LAB round trip only


def test_an_image_without_a_cell_passes_unchanged():
    blank = np.full((64, 64, 3), 230, np.uint8)
    out, ok = replace_background(blank, np.random.default_rng(0), 20.0, (0.0, 1.3), 0.03)
    assert not ok and out is blank


def test_off_by_default_and_placed_after_geometry_before_colour():
    names = [type(op).__name__ for op in build_transform(load_config(None, []), True).transforms]
    assert "RandomBackground" not in names
    cfg = load_config(None, ["augment.background.p=0.4", "augment.lab.stain_p=0.2"])
    ops = build_transform(cfg, True).transforms
    names = [type(op).__name__ for op in ops]
    assert names.index("Affine") < names.index("RandomBackground") < names.index("HEStain") < names.index("OneOf")
    bg = ops[names.index("RandomBackground")]
    assert (bg.p, bg.shift, bg.texture, bg.margin) == (0.4, 20.0, (0.0, 1.3), 0.03)
    half = build_transform(load_config(None, ["augment.background.p=0.4", "augment.strength=0.5"]), True)
    bg = next(op for op in half.transforms if isinstance(op, RandomBackground))
    assert (bg.p, bg.shift) == (0.2, 10.0)


def test_seeded_draws_repeat():
    t = build_transform(load_config(None, ["augment.background.p=1.0", *ONLY]), True)
    img = draw_cell("EO", np.random.default_rng(2), 96).image
    outs = []
    for seed in (7, 7, 8):
        t.set_random_seed(seed)
        outs.append(t(image=img)["image"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    assert not np.array_equal(outs[0], img)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="augment.background"):
        RandomBackground(texture=(1.0, 0.5))
