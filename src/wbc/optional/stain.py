"""Macenko stain normalisation (Macenko et al. 2009, "A method for normalizing histology slides").

Beer-Lambert: optical density OD = -ln(I / Io) is a non-negative mix of two stain vectors (for blood
smears: the nuclear, haematoxylin/methylene-blue-like stain and the eosin-like one). Per image:

1. stained pixels: every channel's OD > `od_threshold` (the pale background carries no stain signal) and
   none clipped to black; the estimate reads the OD smoothed by a `smooth_sigma`-pixel Gaussian, so that
   sensor noise (strongest in OD at dark pixels) does not spread the angles of step 2;
2. the plane of the two largest eigenvectors of their OD covariance; each pixel's angle in that plane;
   the `alpha` and 100 - `alpha` percentile angles are the two stain vectors (robust extremes);
3. concentrations by least squares; their 99th percentile over stained pixels is the stain's "max".

`transform` rescales the image's concentrations to the reference maxima and re-synthesises the pixels
with the reference stain vectors. An image with too few stained pixels, or whose two estimated stains
are nearly parallel, is returned unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ..core.errors import WBCError
from ..core.io import fingerprint, write_json

IO = 255.0
_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / np.float32(IO))
OD_SATURATED = _OD_LUT[1]  # pixel values 0 and 1 (clipped to black)


def optical_density(img: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> float32 OD; 0 stays finite (treated as 1)."""
    return _OD_LUT[_as_image(img)]


def _as_image(img) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise WBCError(f"stain normalisation needs HxWx3 uint8 RGB images, got {img.dtype} {img.shape}")
    return img


def stain_vectors(od: np.ndarray, alpha: float = 1.0) -> np.ndarray | None:
    """Unit stain vectors (2, 3) from stained-pixel ODs (N, 3), the one absorbing more red first (a
    convention only); None when the two are nearly parallel (a one-stain or blank image)."""
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:]  # eigh sorts ascending: the two largest
    plane = plane * np.where(plane.sum(0) < 0, -1.0, 1.0)  # eigenvector sign is arbitrary; OD is positive
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    he /= np.linalg.norm(he, axis=1, keepdims=True)
    return None if abs(he[0] @ he[1]) > 0.995 else he


class MacenkoNormalizer:
    """Fit a reference (stain vectors, max concentrations) on training images; map others onto it."""

    def __init__(self, od_threshold: float = 0.15, alpha: float = 1.0, max_percentile: float = 99.0,
                 min_pixels: int = 100, smooth_sigma: float = 1.0):
        self.od_threshold = float(od_threshold)
        self.smooth_sigma = float(smooth_sigma)
        self.alpha = float(alpha)
        self.max_percentile = float(max_percentile)
        self.min_pixels = int(min_pixels)
        self.stain_matrix: np.ndarray | None = None  # (2, 3) unit OD vectors
        self.max_conc: np.ndarray | None = None  # (2,)

    def _stained_od(self, img: np.ndarray) -> np.ndarray:
        """The estimate's input: stained pixels of the smoothed OD, (N, 3).

        Black-clipped pixels are left out, and out of their neighbours' averages: their OD is a floor, not a
        measurement (the black half of salt-and-pepper noise would otherwise tilt the stain plane by some
        16 degrees). OD mixes linearly, so a smoothed pixel stays inside the stains' cone."""
        od = optical_density(img)
        valid = (od < OD_SATURATED).all(-1)
        if self.smooth_sigma > 0:
            w = valid.astype(np.float32)
            od = cv2.GaussianBlur(od * w[..., None], (0, 0), self.smooth_sigma)
            od /= np.maximum(cv2.GaussianBlur(w, (0, 0), self.smooth_sigma), 1e-6)[..., None]
        od, valid = od.reshape(-1, 3), valid.reshape(-1)
        return od[valid & self._stained(od)]

    def _stained(self, od: np.ndarray) -> np.ndarray:
        t = self.od_threshold
        return (od[:, 0] > t) & (od[:, 1] > t) & (od[:, 2] > t)  # 2x faster than .all(1)

    def _estimate(self, od: np.ndarray):
        """(stain vectors, max concentrations) of stained ODs, or None when they do not define two stains."""
        if len(od) < self.min_pixels:
            return None
        he = stain_vectors(od, self.alpha)
        if he is None:
            return None
        conc = od @ np.linalg.pinv(he)  # (N, 2) least squares
        max_c = np.percentile(conc, self.max_percentile, axis=0)
        if not np.all(np.isfinite(max_c)) or (max_c <= 1e-6).any():
            return None
        return he, max_c

    def fit(self, images, max_pixels: int = 1_000_000, seed: int = 0) -> "MacenkoNormalizer":
        """Reference from the stained pixels of `images` (HxWx3 uint8, a list/array or one image), pooled;
        at most `max_pixels` of them, subsampled with `seed`."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        ods = [self._stained_od(im) for im in images]
        od = np.concatenate(ods) if ods else np.zeros((0, 3), np.float32)
        if len(od) > max_pixels:
            od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
        est = self._estimate(od)
        if est is None:
            raise WBCError(f"stain reference: {len(od)} stained pixels in {len(ods)} images do not show two stains")
        self.stain_matrix, self.max_conc = est
        return self

    def transform(self, img: np.ndarray) -> np.ndarray:
        """`img` (HxWx3 uint8) with the reference's stain colours and intensity; unchanged when it has no
        measurable two-stain signal."""
        if self.stain_matrix is None:
            raise WBCError("MacenkoNormalizer.transform before fit / load_state_dict")
        img = _as_image(img)
        est = self._estimate(self._stained_od(img))
        if est is None:
            return img
        od = optical_density(img).reshape(-1, 3)
        he, max_c = est
        # Pair stains by direction, not by the red-first convention: in Romanowsky-stained smears either
        # stain may absorb more red, so that order flips between images.
        cos = np.abs(he @ self.stain_matrix.T)
        if cos[0, 1] + cos[1, 0] > cos[0, 0] + cos[1, 1]:
            he, max_c = he[::-1], max_c[::-1]
        scale = np.linalg.pinv(he) * (self.max_conc / max_c)
        out = IO * np.exp(-(od @ (scale @ self.stain_matrix).astype(np.float32)))
        return np.clip(out, 0, 255).round().astype(np.uint8).reshape(img.shape)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return self.transform(img)

    def state_dict(self) -> dict:
        """Plain lists and floats (JSON-ready)."""
        if self.stain_matrix is None:
            raise WBCError("MacenkoNormalizer.state_dict before fit")
        return {"stain_matrix": self.stain_matrix.tolist(), "max_conc": self.max_conc.tolist(),
                "od_threshold": self.od_threshold, "alpha": self.alpha,
                "max_percentile": self.max_percentile, "min_pixels": self.min_pixels,
                "smooth_sigma": self.smooth_sigma}

    def load_state_dict(self, state: dict) -> "MacenkoNormalizer":
        try:
            he = np.asarray(state["stain_matrix"], dtype=np.float64)
            max_c = np.asarray(state["max_conc"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise WBCError(f"stain normaliser state: {e!r}") from None
        if he.shape != (2, 3) or max_c.shape != (2,) or not (np.isfinite(he).all() and (max_c > 0).all()):
            raise WBCError(f"stain normaliser state: stain_matrix {he.shape} / max_conc {max_c.shape} invalid")
        self.stain_matrix, self.max_conc = he, max_c
        for k in ("od_threshold", "alpha", "max_percentile", "smooth_sigma"):
            setattr(self, k, float(state.get(k, getattr(self, k))))
        self.min_pixels = int(state.get("min_pixels", self.min_pixels))
        return self


def cache_tag(cfg: dict) -> str:
    """`data.stain_norm` as a `preprocess` hook: normalised images live under this code's hash."""
    return "_stain-" + fingerprint([Path(__file__)])


def build(cfg: dict, pool_images_fn=None):
    """`f(images, split)` normalising each image to a reference fitted on 256 clean training images (drawn with the
    run's seed) and saved beside the cache, so that every later cache build and `classify` use the same one."""
    from ..s1_data.cache import cache_dir

    norm = MacenkoNormalizer()

    def stain(images, split):
        if norm.stain_matrix is None:  # fitted lazily (only a cache build needs it), once per cache
            saved = cache_dir(cfg) / "stain_reference.json"
            if saved.exists():
                norm.load_state_dict(json.loads(saved.read_text()))
            elif pool_images_fn is None:
                raise WBCError(f"data.stain_norm: no stain reference in {saved.parent} (train the run first)")
            else:
                ref = pool_images_fn()
                pick = np.random.default_rng(cfg.get("seed", 0)).permutation(len(ref))[:256]
                norm.fit(np.asarray(ref)[np.sort(pick)])
                write_json(saved, norm.state_dict())
        return np.stack([norm.transform(im) for im in images])

    return stain
