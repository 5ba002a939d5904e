"""Damage score per image and the gate that decides which images the restorer touches.

The score is the RMS of robust z-scores of five features against clean images:
  - log noise sigma (Immerkaer's Laplacian-residual estimator): noise raises it, blur lowers it;
  - background lightness and colour (Lab L, a, b means over the least saturated half of the pixels):
    gain, gamma, vignetting and colour casts move them;
  - chroma blotchiness (band-passed a/b on the background): low-frequency colour noise.
Features are measured at 224 px (the damage simulator's reference size), so a score does not depend on
the input size. The clean reference (median, MAD) and the threshold are fitted on data (`fit_gate`) and
saved in `gate.json`; `DEFAULT_REF` (PBC phase-1 images) is only for a score without a fitted gate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ...core.errors import WBCError
from ...core.io import write_json

FEATURES = ("log_noise", "bg_lightness", "bg_a", "bg_b", "chroma_blotch")
SCORE_SIZE = 224
# Median and 1.4826*MAD of FEATURES over the 1,107 clean PBC phase-1 images (224 px).
DEFAULT_REF = {"center": [-0.6059, 210.5944, 137.205, 138.1635, 4.7058],
               "scale": [0.151, 8.7678, 1.3451, 2.1829, 0.7754]}
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_MIN_SCALE = 1e-3


def damage_features(img: np.ndarray) -> np.ndarray:
    """FEATURES of one uint8 RGB image, as float64."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise WBCError(f"damage score needs a uint8 HxWx3 image, got {got}")
    h, w = img.shape[:2]
    if min(h, w) != SCORE_SIZE:
        f = SCORE_SIZE / min(h, w)
        img = cv2.resize(img, (max(round(w * f), 3), max(round(h * f), 3)),
                         interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    resid = np.abs(cv2.filter2D(grey, -1, _IMMERKAER))[1:-1, 1:-1]
    sigma = float(resid.mean()) * np.sqrt(np.pi / 2) / 6
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    bg = sat <= np.median(sat)  # plasma and pale red cells; the stained WBC is the most saturated part
    ab = lab[..., 1:]
    band = cv2.GaussianBlur(ab, (0, 0), 3) - cv2.GaussianBlur(ab, (0, 0), 12)
    blotch = np.abs(band).sum(2)[bg].mean()
    return np.array([np.log(sigma + 1e-3), *lab[bg].mean(0), blotch], np.float64)


def fit_reference(features: np.ndarray) -> dict:
    """Robust centre and scale of clean-image features (rows = images)."""
    features = np.asarray(features, np.float64)
    center = np.median(features, axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(features - center), axis=0), _MIN_SCALE)
    return {"center": center.tolist(), "scale": scale.tolist()}


def score_features(features: np.ndarray, ref: dict | None = None) -> np.ndarray:
    ref = ref or DEFAULT_REF
    z = (np.atleast_2d(features) - np.asarray(ref["center"])) / np.asarray(ref["scale"])
    return np.sqrt((z ** 2).mean(axis=1))


def damage_score(img: np.ndarray, ref: dict | None = None) -> float:
    """How far one image is from clean ones (0 = typical clean image; larger = more damaged)."""
    return float(score_features(damage_features(img), ref)[0])


def damage_scores(images, ref: dict | None = None) -> np.ndarray:
    return score_features(np.stack([damage_features(im) for im in images]), ref) if len(images) else np.zeros(0)


def fit_gate(clean_scores, damaged_scores) -> float:
    """Threshold maximising balanced accuracy (Youden's J); an image is damaged when score > threshold."""
    clean, dmg = np.asarray(clean_scores, float), np.asarray(damaged_scores, float)
    if not len(clean) or not len(dmg):
        raise WBCError("fit_gate needs clean and damaged scores")
    cuts = np.unique(np.concatenate([clean, dmg]))
    # Midpoints between neighbouring scores, plus one cut below everything.
    cands = np.concatenate([[cuts[0] - 1e-6], (cuts[:-1] + cuts[1:]) / 2])
    tnr = (clean[None, :] <= cands[:, None]).mean(1)
    tpr = (dmg[None, :] > cands[:, None]).mean(1)
    return float(cands[int(np.argmax(tnr + tpr))])


@dataclass
class Gate:
    """Fitted clean reference + threshold; `gate(images) -> (scores, damaged_mask)`."""

    threshold: float
    reference: dict = field(default_factory=lambda: dict(DEFAULT_REF))
    stats: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, clean_images, damaged_images) -> "Gate":
        clean_f = np.stack([damage_features(im) for im in clean_images])
        ref = fit_reference(clean_f)
        clean_s, dmg_s = score_features(clean_f, ref), damage_scores(damaged_images, ref)
        t = fit_gate(clean_s, dmg_s)
        tnr, tpr = float((clean_s <= t).mean()), float((dmg_s > t).mean())
        return cls(t, ref, {"n_clean": len(clean_s), "n_damaged": len(dmg_s), "clean_pass_rate": tnr,
                            "damaged_detect_rate": tpr, "balanced_accuracy": (tnr + tpr) / 2})

    def scores(self, images) -> np.ndarray:
        return damage_scores(images, self.reference)

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(images)
        return s, s > self.threshold

    def save(self, path) -> None:
        write_json(path, {"features": list(FEATURES), "threshold": self.threshold, "reference": self.reference,
                          "stats": self.stats})

    @classmethod
    def load(cls, path) -> "Gate":
        path = Path(path)
        if not path.exists():
            raise WBCError(f"{path}: gate file not found (run `make train-restorer` first)")
        try:
            d = json.loads(path.read_text())
            if d.get("features") != list(FEATURES):
                raise WBCError(f"{path}: gate was fitted on features {d.get('features')}, expected {list(FEATURES)}")
            return cls(float(d["threshold"]), d["reference"], d.get("stats", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise WBCError(f"{path}: not a valid gate file ({type(e).__name__}: {e})") from None
