"""Damage simulator: noise, blur, lighting and JPEG faults like those in WBCBench phase-2 test images.

    apply(image, kind, severity, rng) -> image     one fault of one kind
    damage(image, severity, rng, kinds=None, n_ops=None, group_p=None, kind_weights=None) -> image
                                                   competition-like composite: one blur, one lighting and
                                                   one noise fault (plus JPEG when `kinds` names it)
    DamageTransform(max_severity=3, kinds=None, n_ops=None, p=0.5, severity_weights=None, group_p=None,
                    kind_weights=None)             albumentations 2 ImageOnlyTransform around `damage`

The optional mix (`severity_weights`, `group_p`: the chance each group is applied, `kind_weights` within a
group) describes a damage distribution; `make damage-match` fits it to a target split's images.

Images are uint8 HxWx3 (any channel order); the output has the same shape and dtype. Severity 0 is the
identity, 1-3 are the competition's range and 4 is an extra-hard level for augmentation.

Every parameter is drawn as `lo + u * (hi - lo)` from a per-severity range, with the ranges disjoint and
increasing, and every other random draw (noise fields, angles, signs, centres) independent of severity.
So for a fixed seed a higher severity is the same fault made stronger, and the error to the clean image
grows strictly with severity (tests/test_damage.py checks the PSNR). Spatial sizes (blur radii,
streak lengths) are given for 224 px images and scale with the image size (down to half).
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

NOISE = ("gaussian_noise", "color_noise", "salt_pepper", "iso_noise")
BLUR = ("gaussian_blur", "defocus_blur", "motion_blur")
LIGHTING = ("gain", "gamma", "vignette", "color_cast")
COMPRESSION = ("jpeg",)
KINDS = NOISE + BLUR + LIGHTING + COMPRESSION
# Composite order follows image formation: optics, exposure/ISP, sensor noise, then compression.
GROUPS = {"blur": BLUR, "lighting": LIGHTING, "noise": NOISE, "compression": COMPRESSION}
DEFAULT_GROUPS = ("blur", "lighting", "noise")
MAX_SEVERITY = 4
REFERENCE_SIZE = 224

# kind -> (lo, hi) per severity 1..4; disjoint and increasing so severities are strictly ordered.
RANGES = {
    "gaussian_noise": ((4, 8), (11, 17), (21, 30), (35, 45)),  # std, intensity units
    "color_noise": ((3, 6), (8, 12), (14, 20), (24, 32)),  # std of low-frequency chroma blotches
    "salt_pepper": ((0.004, 0.01), (0.015, 0.03), (0.04, 0.07), (0.09, 0.13)),  # fraction of pixels
    "iso_noise": ((5, 9), (12, 18), (22, 32), (38, 50)),  # std at full brightness
    "gaussian_blur": ((0.8, 1.2), (1.4, 2.0), (2.4, 3.2), (3.8, 5.0)),  # sigma, px at 224
    "defocus_blur": ((1.2, 2.0), (2.5, 3.5), (4.2, 5.8), (6.5, 8.5)),  # disc radius, px at 224
    "motion_blur": ((3, 5), (6.5, 9.5), (11, 15), (17, 22)),  # streak length, px at 224
    "gain": ((0.10, 0.18), (0.24, 0.36), (0.44, 0.60), (0.70, 0.90)),  # |log gain|
    "gamma": ((0.12, 0.22), (0.30, 0.45), (0.55, 0.75), (0.85, 1.10)),  # |log gamma|
    "vignette": ((0.12, 0.2), (0.26, 0.38), (0.45, 0.6), (0.68, 0.85)),  # darkening / glare strength
    "color_cast": ((6, 12), (16, 26), (32, 46), (54, 70)),  # shift length, intensity units
    "jpeg": ((58, 75), (34, 48), (17, 26), (6, 12)),  # quality (lower is worse)
}


def _check(image: np.ndarray, severity: int) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"damage needs a uint8 HxWx3 image, got {got}")
    if severity != int(severity) or not 0 <= int(severity) <= MAX_SEVERITY:  # 0.5 would index level 4
        raise ValueError(f"severity must be a whole number in 0..{MAX_SEVERITY}, got {severity}")


def _param(kind: str, severity: int, rng: np.random.Generator) -> float:
    lo, hi = RANGES[kind][severity - 1]
    return lo + rng.random() * (hi - lo)


def _scale(image: np.ndarray) -> float:
    # Floored so that small test images still get a visible severity-1 blur.
    return max(min(image.shape[:2]) / REFERENCE_SIZE, 0.5)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and saturate a float32 scratch array (overwritten: in-place ops save the data loader's time)."""
    np.clip(x, 0, 255, out=x)  # clipping first gives the same bytes as rint-then-clip
    return np.rint(x, out=x).astype(np.uint8)


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(image, -1, (kernel / kernel.sum()).astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def _radius_grid(h: int, w: int, cy: float, cx: float) -> np.ndarray:
    """Distance from (cy, cx), normalised so the image half-diagonal is 1."""
    y, x = np.ogrid[:h, :w]
    return np.sqrt(((y - cy) / (h / 2)) ** 2 + ((x - cx) / (w / 2)) ** 2) / np.sqrt(2)


def _gaussian_noise(img, v, rng):
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= v
    noise += img
    return _to_uint8(noise)


def _color_noise(img, v, rng):
    h, w = img.shape[:2]
    # Blotches about 1/8 of the image wide at any size, as in smartphone chroma noise.
    small = rng.standard_normal((max(h // 8, 2), max(w // 8, 2), 3), dtype=np.float32)
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    # Colour only, brightness kept. The channel mean summed by hand: the same float32 sums as
    # mean(axis=2), without its slow reduction over a 3-long axis (color_noise 1.9 -> 0.7 ms at 224 px).
    mean = field[..., 0] + field[..., 1]
    mean += field[..., 2]
    mean /= 3
    field -= mean[..., None]
    field *= v
    field += img
    return _to_uint8(field)


def _salt_pepper(img, v, rng):
    h, w = img.shape[:2]
    u = rng.random((h, w))
    salt = rng.random((h, w)) < 0.5
    out = img.copy()
    hit = u < v  # the hit set grows with v, so a stronger level keeps every earlier hit
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def _iso_noise(img, v, rng):
    x = img.astype(np.float32)
    lum = rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
    chroma = rng.standard_normal(img.shape, dtype=np.float32)
    # Shot noise grows with the signal; a smaller chroma part gives the coloured speckle.
    # In place, in the order of x + v * sqrt(x / 255) * lum + 0.45 * v * chroma.
    shot = x / 255.0
    np.sqrt(shot, out=shot)
    shot *= v
    shot *= lum
    shot += x
    chroma *= 0.45 * v
    shot += chroma
    return _to_uint8(shot)


def _gaussian_blur(img, v, rng):
    sigma = v * _scale(img)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _defocus_blur(img, v, rng):
    r = v * _scale(img)
    n = int(np.ceil(r)) + 1
    y, x = np.mgrid[-n:n + 1, -n:n + 1]
    # Anti-aliased disc edge: the kernel changes continuously with the radius.
    disc = np.clip(r + 0.5 - np.sqrt(x * x + y * y), 0, 1)
    return _filter(img, disc)


def _motion_blur(img, v, rng):
    length = v * _scale(img)
    angle = rng.random() * np.pi
    n = int(np.ceil(length / 2)) + 1
    kernel = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
    t = np.linspace(-length / 2, length / 2, 64)
    px, py = n + t * np.cos(angle), n + t * np.sin(angle)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - x0, py - y0
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(kernel, (y0 + dy, x0 + dx), wgt)  # bilinear splat keeps sub-pixel lengths
    return _filter(img, kernel)


def _sign(rng) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _gain(img, v, rng):
    return _to_uint8(img * np.float32(np.exp(_sign(rng) * v)))  # float32 product: a fresh scratch array


def _gamma(img, v, rng):
    gamma = np.exp(_sign(rng) * v)
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** gamma)
    return cv2.LUT(img, lut)


def _vignette(img, v, rng):
    h, w = img.shape[:2]
    glare = rng.random() < 0.5
    cy, cx = h / 2 + (rng.random() - 0.5) * h / 4, w / 2 + (rng.random() - 0.5) * w / 4
    r = _radius_grid(h, w, cy, cx).astype(np.float32)[..., None]
    x = img.astype(np.float32)
    if glare:  # washed-out bright centre, as from a misplaced lamp: x + v * 1.3 * (255 - x) * exp(-(r / 0.45)^2)
        lit = 255.0 - x
        lit *= v * 1.3
        lit *= np.exp(-(r / 0.45) ** 2)
        lit += x
        return _to_uint8(lit)
    x *= 1.0 - v * np.minimum(1.6 * r * r, 1.0)  # dark corners
    return _to_uint8(x)


def _color_cast(img, v, rng):
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return _to_uint8(img + (v * direction).astype(np.float32))


def _jpeg(img, v, rng):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(round(v))])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


_OPS = {
    "gaussian_noise": _gaussian_noise, "color_noise": _color_noise, "salt_pepper": _salt_pepper,
    "iso_noise": _iso_noise, "gaussian_blur": _gaussian_blur, "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur, "gain": _gain, "gamma": _gamma, "vignette": _vignette,
    "color_cast": _color_cast, "jpeg": _jpeg,
}


def apply(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One fault of `kind` at `severity` (0 = unchanged copy). Deterministic for the state of `rng`."""
    _check(image, severity)
    if kind not in _OPS:
        raise ValueError(f"unknown damage kind '{kind}' (known: {', '.join(KINDS)})")
    if severity == 0:
        return image.copy()
    v = _param(kind, int(severity), rng)
    return _OPS[kind](image, v, rng)


def _groups(kinds: Sequence[str] | None) -> list[tuple[str, tuple[str, ...]]]:
    """(group name, its kinds in use) for the groups `kinds` touches (default: blur, lighting, noise)."""
    if kinds is None:
        return [(g, GROUPS[g]) for g in DEFAULT_GROUPS]
    unknown = [k for k in kinds if k not in _OPS]
    if unknown:
        raise ValueError(f"unknown damage kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    groups = [(g, tuple(k for k in members if k in kinds)) for g, members in GROUPS.items()]
    groups = [(g, m) for g, m in groups if m]
    if not groups:
        raise ValueError("kinds is empty")
    return groups


def check_mix(groups: list[tuple[str, tuple[str, ...]]], group_p: dict | None, kind_weights: dict | None) -> None:
    """Validate an optional damage mix against the groups in use (ValueError names the bad entry)."""
    for g, q in (group_p or {}).items():
        if g not in GROUPS:
            raise ValueError(f"group_p: unknown group '{g}' (known: {', '.join(GROUPS)})")
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"group_p: {g} must be in [0, 1], got {q}")
    for k, w in (kind_weights or {}).items():
        if k not in _OPS:
            raise ValueError(f"kind_weights: unknown damage kind '{k}' (known: {', '.join(KINDS)})")
        if float(w) < 0:
            raise ValueError(f"kind_weights: {k} must be >= 0, got {w}")
    for g, members in groups:
        if kind_weights and sum(float(kind_weights.get(k, 1.0)) for k in members) <= 0:
            raise ValueError(f"kind_weights: every kind of group '{g}' has weight 0")


def _draw_kinds(groups, rng, n_ops, group_p, kind_weights) -> list[str]:
    if n_ops is not None:
        if not 1 <= n_ops <= len(groups):
            raise ValueError(f"n_ops must be in 1..{len(groups)} for these kinds, got {n_ops}")
        keep = np.sort(rng.choice(len(groups), size=n_ops, replace=False))
        groups = [groups[i] for i in keep]
    if group_p:  # each group applied with its own chance (a group not named is always applied)
        hit = rng.random(len(groups))
        groups = [(g, m) for (g, m), u in zip(groups, hit) if u < float(group_p.get(g, 1.0))]
    if not kind_weights:
        return [m[rng.integers(len(m))] for _, m in groups]
    out = []
    for _, m in groups:
        cdf = np.cumsum([float(kind_weights.get(k, 1.0)) for k in m])
        out.append(m[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(m) - 1)])
    return out


def damage(image: np.ndarray, severity: int, rng: np.random.Generator,
           kinds: Sequence[str] | None = None, n_ops: int | None = None,
           group_p: dict | None = None, kind_weights: dict | None = None) -> np.ndarray:
    """Competition-like composite fault: one kind from each group (blur, lighting, noise, [jpeg]).

    `kinds` restricts the choice (a group with none of them is skipped); `n_ops` keeps a random subset of
    that many groups; `group_p` applies each named group with that chance; `kind_weights` (default 1 each)
    weights the kinds within a group. Kinds and subsets are drawn before any severity-dependent value, so for
    a fixed seed every severity applies the same faults, only stronger.
    """
    _check(image, severity)
    groups = _groups(kinds)
    check_mix(groups, group_p, kind_weights)
    chosen = _draw_kinds(groups, rng, n_ops, group_p, kind_weights)
    seeds = rng.integers(0, 2**63, size=len(chosen))
    out = image.copy()
    if severity == 0:
        return out
    for kind, s in zip(chosen, seeds):
        # A child generator per op keeps each op's draws aligned across severities.
        out = apply(out, kind, severity, np.random.default_rng(s))
    return out


def _make_transform_class():
    import albumentations as A

    class DamageTransform(A.ImageOnlyTransform):
        """`damage` at a severity drawn from 1..max_severity (uniformly, or by `severity_weights`); seeded by
        `A.Compose(seed=...)`."""

        def __init__(self, max_severity: int = 3, kinds: Sequence[str] | None = None, n_ops: int | None = None,
                     p: float = 0.5, severity_weights: Sequence[float] | None = None,
                     group_p: dict | None = None, kind_weights: dict | None = None):
            super().__init__(p=p)
            if not 1 <= max_severity <= MAX_SEVERITY:
                raise ValueError(f"max_severity must be in 1..{MAX_SEVERITY}, got {max_severity}")
            groups = _groups(kinds)
            if n_ops is not None and not 1 <= n_ops <= len(groups):
                raise ValueError(f"n_ops must be in 1..{len(groups)} for these kinds, got {n_ops}")
            check_mix(groups, group_p, kind_weights)
            if severity_weights is not None:
                severity_weights = [float(w) for w in severity_weights]
                if len(severity_weights) != max_severity or min(severity_weights) < 0 or sum(severity_weights) <= 0:
                    raise ValueError(f"severity_weights needs {max_severity} non-negative weights (severities "
                                     f"1..{max_severity}) with a positive sum, got {severity_weights}")
            self.max_severity = int(max_severity)
            self.kinds = None if kinds is None else tuple(kinds)
            self.n_ops = n_ops
            self.severity_weights = severity_weights
            self.group_p = dict(group_p) if group_p else None
            self.kind_weights = dict(kind_weights) if kind_weights else None

        def get_params(self) -> dict:
            # Albumentations seeds py_random from Compose(seed=...); the op seed makes replays exact.
            if self.severity_weights is None:
                severity = self.py_random.randint(1, self.max_severity)
            else:
                severity = self.py_random.choices(range(1, self.max_severity + 1), self.severity_weights)[0]
            return {"severity": severity, "seed": self.py_random.getrandbits(63)}

        def apply(self, img: np.ndarray, severity: int = 1, seed: int = 0, **params) -> np.ndarray:
            return damage(img, severity, np.random.default_rng(seed), self.kinds, self.n_ops, self.group_p,
                          self.kind_weights)

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("max_severity", "kinds", "n_ops", "severity_weights", "group_p", "kind_weights")

    DamageTransform.__module__ = __name__
    return DamageTransform


def __getattr__(name: str):
    # Built on first use: importing albumentations takes seconds, and the simulator itself does not need it.
    if name == "DamageTransform":
        cls = _make_transform_class()
        globals()["DamageTransform"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
