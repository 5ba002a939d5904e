"""Hematoxylin-channel input: the same cell stained harder or with another counterstain gives the same grey map."""
import numpy as np
import pytest
from skimage.color import hed2rgb

from wbc.core.errors import WBCError
from wbc.optional.hematoxylin import hematoxylin
from wbc.s1_data.cache import cache_dir
from wbc.s1_data.preprocess import build_preprocess
from wbc.s3_train.inputs import load_fold_data


def _masks(size=96):
    yy, xx = np.mgrid[:size, :size] / size
    cell = np.hypot(xx - 0.5, yy - 0.5) < 0.3
    nucleus = (np.hypot(xx - 0.42, yy - 0.5) < 0.12) | (np.hypot(xx - 0.6, yy - 0.45) < 0.1)  # two lobes
    return cell, nucleus


def _cell(h_scale=1.0, e_amount=0.15):
    """Beer-Lambert rendering through the Ruifrok vectors: a nucleus (haematoxylin) in a counterstained cell."""
    cell, nucleus = _masks()
    hed = np.zeros(cell.shape + (3,))
    hed[..., 0] = h_scale * (0.03 * cell + 0.25 * nucleus)
    hed[..., 1] = e_amount * cell
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def test_stain_strength_and_counterstain_drop_out():
    cell, nucleus = _masks()
    a, b = _cell(), _cell(h_scale=1.5, e_amount=0.3)  # another lab: stronger nuclear stain, twice the eosin
    assert np.abs(a.astype(int) - b.astype(int))[cell].mean() > 25  # far apart in RGB (and in grey)
    ha, hb = hematoxylin(a), hematoxylin(b)
    assert (ha[..., 0] == ha[..., 1]).all() and (ha[..., 0] == ha[..., 2]).all()  # grey, three channels
    assert np.abs(ha.astype(int) - hb.astype(int))[cell].max() <= 2  # the same map
    assert ha[nucleus].mean() < 40 and ha[cell & ~nucleus].mean() > 150 and ha[~cell].mean() > 250


def test_blank_and_malformed_images():
    assert (hematoxylin(np.full((8, 8, 3), 240, np.uint8)) == 128).all()
    with pytest.raises(WBCError, match="HxWx3 uint8"):
        hematoxylin(np.zeros((8, 8), np.uint8))


def test_hematoxylin_cache_and_new_images(cfg2):
    cfg = cfg2("data.hematoxylin=true")
    plain, grey = load_fold_data(cfg2()), load_fold_data(cfg)
    assert "_hema-" in cache_dir(cfg).name and cache_dir(cfg) != cache_dir(cfg2())
    for imgs in (grey.pool_images, grey.holdout_images, grey.test_images):  # every split went through it
        assert (imgs[..., 0] == imgs[..., 2]).all()
    assert not (plain.pool_images[..., 0] == plain.pool_images[..., 2]).all()
    prep = build_preprocess(cfg)  # what classify / crosslab apply to another lab's images
    np.testing.assert_array_equal(prep(np.asarray(plain.pool_images[:4]), "classify"), grey.pool_images[:4])
