"""The decoded-image cache: rebuilt when IDs, image files or the decoder change, never half written, a centre crop
under its own folder."""
import numpy as np
import pytest

from wbc.core.errors import WBCError


def test_cache_is_rebuilt_when_ids_change_and_never_half_written(sample_root, make_cfg):
    from wbc.s1_data.cache import cache_dir, split_images
    from wbc.s1_data.layout import read_split

    cfg = make_cfg(sample_root)
    df = read_split(sample_root, "phase1")
    a = np.array(split_images(cfg, df.iloc[:6], "phase1"))
    b = np.array(split_images(cfg, df.iloc[2:8], "phase1"))  # other IDs: rebuilt, not the stale array
    assert len(b) == 6 and np.array_equal(b[:4], a[2:6]) and not np.array_equal(b, a)

    class Failing(np.ndarray):
        def tofile(self, path):  # a disk that fills up mid-write
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError):
        split_images(cfg, df.iloc[:3], "phase1", transform=lambda im, split: im.view(Failing))
    assert sorted(p.name for p in cache_dir(cfg).iterdir()) == ["phase1.ids.json", "phase1.u8"]
    assert np.array_equal(split_images(cfg, df.iloc[2:8], "phase1"), b)  # the previous cache is intact


def test_cache_is_rebuilt_when_an_image_file_is_replaced(sample_root, make_cfg, tmp_path):
    """Same IDs, new pixels (a regenerated sample set, a re-released split): the cache must not serve the old ones."""
    import shutil

    from wbc.s1_data.cache import split_images
    from wbc.s1_data.layout import read_split

    root = shutil.copytree(sample_root, tmp_path / "data")
    cfg = make_cfg(root)
    df = read_split(root, "phase1").iloc[:4]
    before = np.array(split_images(cfg, df, "phase1"))
    shutil.copyfile(df["path"].iloc[1], df["path"].iloc[0])  # image 0 now holds image 1's pixels
    after = np.array(split_images(cfg, df, "phase1"))
    assert np.array_equal(after[0], before[1]) and np.array_equal(after[1:], before[1:])


def test_cache_is_rebuilt_when_the_decoder_changes(sample_root, make_cfg, monkeypatch):
    """Images decoded by older code (another resize, say) are rebuilt, not served from the cache."""
    import wbc.s1_data.cache as cache
    from wbc.s1_data.layout import read_split

    cfg = make_cfg(sample_root)
    df = read_split(sample_root, "phase1").iloc[:3]
    before = np.array(cache.split_images(cfg, df, "phase1"))
    monkeypatch.setattr(cache, "resize", lambda img, size: np.zeros((size, size, 3), np.uint8))
    assert np.array_equal(cache.split_images(cfg, df, "phase1"), before)  # same code: served from the cache
    monkeypatch.setattr(cache, "CODE_HASH", "changed")
    assert not np.array(cache.split_images(cfg, df, "phase1")).any()


def test_center_crop_zooms_the_cached_images_under_their_own_cache(sample_root, make_cfg):
    """`data.center_crop` keeps the central square of each image before resizing, in a cache of its own, so a
    zoomed run never reads the full-frame images (or the other way round)."""
    import cv2

    from wbc.s1_data.cache import cache_dir, center_crop, read_image, split_images
    from wbc.s1_data.layout import read_split

    img = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(10, 8, 3)
    assert np.array_equal(center_crop(img, 0.5), img[3:7, 2:6]) and center_crop(img, 1.0) is img
    df = read_split(sample_root, "phase1").iloc[:3]
    full_cfg, zoom_cfg = make_cfg(sample_root, "data.image_size=32"), make_cfg(sample_root, "data.image_size=32",
                                                                               "data.center_crop=0.5")
    assert cache_dir(zoom_cfg) != cache_dir(full_cfg) and cache_dir(zoom_cfg).name.endswith("_32_crop0.5")
    full, zoom = np.array(split_images(full_cfg, df, "phase1")), np.array(split_images(zoom_cfg, df, "phase1"))
    src = read_image(df["path"].iloc[0])  # 64 px: the central 32 px, not resized at all
    assert np.array_equal(zoom[0], src[16:48, 16:48])
    assert np.array_equal(full[0], cv2.resize(src, (32, 32), interpolation=cv2.INTER_AREA))
    with pytest.raises(WBCError, match="center_crop"):
        cache_dir(make_cfg(sample_root, "data.center_crop=1.5"))
