"""Damage simulator: shape/dtype, identity at severity 0, determinism, strictly ordered severities, Compose use."""

import cv2
import numpy as np
import pytest

from wbc.s1_data import damage as D


def smear(size: int, seed: int) -> np.ndarray:
    """A cell-like test image: a pale background, some discs, a dark nucleus, a little texture."""
    r = np.random.default_rng(seed)
    img = np.full((size, size, 3), (240, 222, 212), np.float32)
    for _ in range(6):
        cv2.circle(img, tuple(int(v) for v in r.integers(0, size, 2)), int(size * 0.12), (222, 182, 190), -1)
    cv2.circle(img, (size // 2, size // 2), int(size * 0.22), (200, 180, 214), -1)
    cv2.ellipse(img, (size // 2, size // 2), (int(size * 0.12), int(size * 0.07)), 30, 0, 360, (84, 46, 132), -1)
    img += r.normal(0, 3, img.shape)
    return np.clip(cv2.GaussianBlur(img, (3, 3), 0.8), 0, 255).astype(np.uint8)


def psnr(a, b) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return np.inf if mse == 0 else 10 * np.log10(255**2 / mse)


IMG = smear(96, 0)


def test_kinds_and_groups():
    assert D.KINDS == ("gaussian_noise", "color_noise", "salt_pepper", "iso_noise", "gaussian_blur", "defocus_blur",
                       "motion_blur", "gain", "gamma", "vignette", "color_cast", "jpeg")
    assert set(D.NOISE) | set(D.BLUR) | set(D.LIGHTING) | {"jpeg"} == set(D.KINDS)
    assert not set(D.NOISE) & set(D.BLUR) and not set(D.BLUR) & set(D.LIGHTING)


@pytest.mark.parametrize("kind", D.KINDS)
def test_apply_keeps_shape_dtype_and_is_seeded(kind):
    img = smear(72, 1)[:, :50]  # not square
    out = D.apply(img, kind, 2, np.random.default_rng(3))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    assert np.array_equal(out, D.apply(img, kind, 2, np.random.default_rng(3)))
    assert np.array_equal(img, smear(72, 1)[:, :50])  # input untouched
    same = D.apply(img, kind, 0, np.random.default_rng(3))
    assert np.array_equal(same, img) and same is not img


def test_different_seeds_differ():
    a = D.damage(IMG, 2, np.random.default_rng(0))
    assert np.array_equal(a, D.damage(IMG, 2, np.random.default_rng(0)))
    assert not np.array_equal(a, D.damage(IMG, 2, np.random.default_rng(1)))


@pytest.mark.parametrize("kind", D.KINDS + ("composite",))
def test_psnr_strictly_falls_with_severity(kind):
    for img in (IMG, smear(224, 1)):
        for seed in range(8):
            ps = []
            for sev in range(1, D.MAX_SEVERITY + 1):
                rng = np.random.default_rng(seed)
                out = D.damage(img, sev, rng) if kind == "composite" else D.apply(img, kind, sev, rng)
                ps.append(psnr(img, out))
            assert all(a > b for a, b in zip(ps, ps[1:])), (kind, seed, ps)


def test_composite_identity_and_kind_choice():
    out = D.damage(IMG, 0, np.random.default_rng(0))
    assert np.array_equal(out, IMG) and out is not IMG
    # Only gain allowed: the output is the input times one factor (unclipped pixels).
    out = D.damage(IMG, 2, np.random.default_rng(0), kinds=["gain"]).astype(float)
    ok = (out > 5) & (out < 250)
    ratio = out[ok] / IMG.astype(float)[ok]
    assert abs(ratio.mean() - 1) > 0.2 and ratio.std() < 0.02
    # Blur alone keeps the mean colour; adding a lighting group changes it.
    blur = D.damage(IMG, 3, np.random.default_rng(0), kinds=D.BLUR)
    assert np.abs(blur.mean((0, 1)) - IMG.mean((0, 1))).max() < 1
    both = [D.damage(IMG, 3, np.random.default_rng(s), kinds=D.BLUR + ("gain",)) for s in range(3)]
    assert all(np.abs(b.mean((0, 1)) - IMG.mean((0, 1))).max() > 10 for b in both)
    one = D.damage(IMG, 3, np.random.default_rng(0), n_ops=1)
    assert one.shape == IMG.shape
    with pytest.raises(ValueError, match="unknown damage kind"):
        D.damage(IMG, 1, np.random.default_rng(0), kinds=["sparkle"])
    with pytest.raises(ValueError, match="n_ops"):
        D.damage(IMG, 1, np.random.default_rng(0), n_ops=4)
    with pytest.raises(ValueError, match="severity"):
        D.damage(IMG, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        D.apply(IMG.astype(np.float32), "gain", 1, np.random.default_rng(0))


def test_n_ops_applies_that_many_groups():
    # Blur alone keeps the mean colour; gain alone scales every pixel by one factor; both do neither.
    kinds = []
    for s in range(12):
        out = D.damage(IMG, 3, np.random.default_rng(s), kinds=D.BLUR + ("gain",), n_ops=1).astype(float)
        ok = (out > 5) & (out < 250)
        if np.abs(out.mean((0, 1)) - IMG.mean((0, 1))).max() < 1:
            kinds.append("blur")
        else:
            assert (out[ok] / IMG.astype(float)[ok]).std() < 0.02, s
            kinds.append("gain")
    assert set(kinds) == {"blur", "gain"}


def test_transform_in_compose_is_reproducible():
    import albumentations as A

    def run(seed):
        t = A.Compose([A.HorizontalFlip(p=0.5), D.DamageTransform(max_severity=3, p=0.8)], seed=seed)
        return [t(image=IMG)["image"] for _ in range(6)]

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert sum(not np.array_equal(x, IMG) and not np.array_equal(x, IMG[:, ::-1]) for x in a) >= 3
    off = A.Compose([D.DamageTransform(p=0.0)], seed=0)
    assert np.array_equal(off(image=IMG)["image"], IMG)
    t = D.DamageTransform(max_severity=2, kinds=D.NOISE, p=1.0)
    t.set_random_seed(0)
    assert {t.get_params()["severity"] for _ in range(50)} == {1, 2}
    with pytest.raises(ValueError):
        D.DamageTransform(max_severity=9)


GREY = np.full((48, 48, 3), 128, np.uint8)


def _pure_salt_pepper(out):
    return set(np.unique(out)) <= {0, 128, 255}


def test_mix_picks_groups_and_kinds_by_their_weights():
    none = {"blur": 0.0, "lighting": 0.0, "noise": 0.0}
    assert all(np.array_equal(D.damage(IMG, s, np.random.default_rng(s), group_p=none), IMG) for s in range(1, 5))
    noise_only = {"blur": 0.0, "lighting": 0.0}  # a group not named is always applied
    sp = {"salt_pepper": 3.0, "gaussian_noise": 1.0, "color_noise": 0.0, "iso_noise": 0.0}
    outs = [D.damage(GREY, 3, np.random.default_rng(i), group_p=noise_only, kind_weights=sp) for i in range(400)]
    share = np.mean([_pure_salt_pepper(o) for o in outs])
    assert 0.68 < share < 0.82  # 3 : 1 against gaussian noise
    assert not any(np.array_equal(o, GREY) for o in outs)
    half = [D.damage(GREY, 3, np.random.default_rng(i), group_p={"blur": 0.0, "lighting": 0.0, "noise": 0.3},
                     kind_weights={"salt_pepper": 1.0, "gaussian_noise": 0.0, "color_noise": 0.0, "iso_noise": 0.0})
            for i in range(400)]
    assert 0.24 < np.mean([not np.array_equal(o, GREY) for o in half]) < 0.36


def test_transform_draws_severities_by_their_weights():
    import albumentations as A

    t = D.DamageTransform(max_severity=4, severity_weights=[0, 0, 1, 3], p=1.0)
    t.set_random_seed(0)
    sev = [t.get_params()["severity"] for _ in range(800)]
    assert set(sev) == {3, 4} and 0.7 < np.mean(np.array(sev) == 4) < 0.8
    mixed = A.Compose([D.DamageTransform(max_severity=3, p=1.0, group_p={"blur": 0.0, "lighting": 0.0},
                                         kind_weights={"salt_pepper": 1.0, "gaussian_noise": 0.0,
                                                       "color_noise": 0.0, "iso_noise": 0.0})], seed=0)
    assert all(_pure_salt_pepper(mixed(image=GREY)["image"]) for _ in range(20))


@pytest.mark.parametrize("kwargs, match", [
    ({"severity_weights": [1, 1]}, "severity_weights"),
    ({"severity_weights": [0, 0, 0]}, "severity_weights"),
    ({"group_p": {"optics": 0.5}}, "unknown group"),
    ({"group_p": {"blur": 1.5}}, r"in \[0, 1\]"),
    ({"kind_weights": {"smudge": 1.0}}, "unknown damage kind"),
    ({"kind_weights": {"gain": 0, "gamma": 0, "vignette": 0, "color_cast": 0}}, "group 'lighting'"),
])
def test_bad_mix_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.DamageTransform(max_severity=3, **kwargs)


def test_config_mix_reaches_the_training_transform():
    from wbc.core.config import load_config
    from wbc.s1_data.augment import build_transform

    cfg = load_config(None, ["augment.damage.p=1.0", "augment.damage.max_severity=2",
                             "augment.damage.severity_weights=[0,1]", "augment.damage.group_p={noise: 0.0}"])
    t = [op for op in build_transform(cfg, True).transforms if isinstance(op, D.DamageTransform)][0]
    assert t.severity_weights == [0.0, 1.0] and t.group_p == {"noise": 0.0} and t.kind_weights is None


def _support(size: int, kind: str) -> int:
    """Width of the blurred spot of one bright pixel."""
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 2, size // 2] = 255
    xs = np.nonzero(D.apply(img, kind, 3, np.random.default_rng(0))[..., 0].max(0) > 0)[0]
    return int(xs.max() - xs.min())


def test_blur_sizes_scale_with_the_image_size():
    # radii are given at 224 px: twice the image, twice the spot (same seed, same draw)
    assert _support(448, "defocus_blur") == pytest.approx(2 * _support(224, "defocus_blur"), abs=2)
    assert _support(224, "defocus_blur") >= 8


def test_color_noise_keeps_brightness_and_gain_goes_both_ways():
    grey = np.full((64, 64, 3), 128, np.uint8)
    out = D.apply(grey, "color_noise", 3, np.random.default_rng(0)).astype(float)
    assert np.abs(out - 128).max() > 20 and np.abs(out.mean(2) - 128).max() <= 0.5  # chroma only
    means = [D.apply(grey, "gain", 2, np.random.default_rng(s)).mean() for s in range(8)]
    assert min(means) < 110 and max(means) > 150  # darker or brighter by the drawn sign


@pytest.mark.parametrize("severity", [0.5, 2.5, -1, D.MAX_SEVERITY + 1])
def test_a_severity_that_is_not_a_level_is_refused(severity):
    img = np.full((32, 32, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="severity must be a whole number"):
        D.apply(img, "gaussian_noise", severity, np.random.default_rng(0))
