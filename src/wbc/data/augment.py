"""albumentations 2 pipelines: geometry, colour / stain jitter and competition-like damage.

`augment.strength` scales every probability and magnitude (but the affine rotation's angle range, whose probability
it scales), so one number dials the whole policy (and `tune-train` can search it). Normalisation happens on the
device, not here: workers ship uint8.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from ..errors import WBCError


def _scaled(v: float, s: float, cap: float = 1.0) -> float:
    return float(min(cap, v * s))


def _base_ops(a: dict, s: float) -> list:
    """Geometry and colour / stain jitter."""
    ops = []
    if a.get("flip"):
        ops += [A.HorizontalFlip(p=_scaled(a["flip"], s)), A.VerticalFlip(p=_scaled(a["flip"], s))]
    if a.get("rot90"):
        ops.append(A.RandomRotate90(p=_scaled(a["rot90"], s)))
    af = a.get("affine") or {}
    if af.get("p"):
        lo, hi = af["scale"]
        ops.append(A.Affine(scale=(1 - (1 - lo) * s, 1 + (hi - 1) * s),
                            translate_percent=(-af["translate"] * s, af["translate"] * s),
                            rotate=(-af["rotate"], af["rotate"]), border_mode=cv2.BORDER_REFLECT_101,
                            p=_scaled(af["p"], s)))
    co = a.get("color") or {}
    if co.get("p"):
        ops.append(A.OneOf([
            A.HueSaturationValue(hue_shift_limit=co["hue"] * s, sat_shift_limit=co["saturation"] * s,
                                 val_shift_limit=co["value"] * s, p=1.0),
            A.RandomBrightnessContrast(brightness_limit=co["brightness"] * s, contrast_limit=co["contrast"] * s,
                                       p=1.0),
        ], p=_scaled(co["p"], s)))
    return ops


def _damage_ops(a: dict, s: float, p: float | None = None) -> list:
    """The damage simulator at the config's chance (or at `p`), as a one-op list (empty when off)."""
    dm = a.get("damage") or {}
    if not dm.get("p"):
        return []
    from .damage import DamageTransform

    # The mix (severity_weights, group_p, kind_weights) is a fitted distribution (`make damage-match`);
    # strength scales only its probability, not its shape.
    return [DamageTransform(max_severity=int(dm.get("max_severity", 3)), p=_scaled(dm["p"], s) if p is None else p,
                            severity_weights=dm.get("severity_weights"), group_p=dm.get("group_p"),
                            kind_weights=dm.get("kind_weights"))]


def build_transform(cfg: dict, train: bool) -> A.Compose | None:
    """The training pipeline, or None for evaluation (TTA views are applied on the device)."""
    if not train:
        return None
    a, s = cfg["augment"], float(cfg["augment"].get("strength", 1.0))
    return A.Compose(_base_ops(a, s) + _damage_ops(a, s))


class DamageViews:
    """Views for damage-consistency training (AugMix-style): geometry and colour are drawn once per image;
    view 0 then gets the recipe's damage (at its chance), views 1.. each get a fresh draw of damage, always
    applied. The loss is the recipe's on view 0 plus a Jensen-Shannon term across all views."""

    def __init__(self, cfg: dict, n_views: int):
        a, s = cfg["augment"], float(cfg["augment"].get("strength", 1.0))
        if n_views < 2:
            raise WBCError(f"train.consistency.views must be >= 2, got {n_views}")
        if not _damage_ops(a, s):
            raise WBCError("train.consistency needs the damage augmentation (augment.damage.p > 0)")
        self.n_views = int(n_views)
        self.base = A.Compose(_base_ops(a, s))
        self.first = A.Compose(_damage_ops(a, s))
        self.extra = A.Compose(_damage_ops(a, s, p=1.0))

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        """(n_views, H, W, 3) uint8; every draw follows from `seed`."""
        seeds = np.random.SeedSequence(seed).generate_state(self.n_views + 1)
        self.base.set_random_seed(int(seeds[0]))
        img = self.base(image=image)["image"]
        out = []
        for v in range(self.n_views):
            t = self.first if v == 0 else self.extra
            t.set_random_seed(int(seeds[v + 1]))
            out.append(t(image=img)["image"])
        return np.stack(out)


def train_transform(cfg: dict):
    """The training augmentation: `DamageViews` when damage consistency is on, else the one-view pipeline."""
    cons = cfg["train"].get("consistency") or {}
    if float(cons.get("weight") or 0) > 0:
        return DamageViews(cfg, int(cons.get("views", 3)))
    return build_transform(cfg, train=True)
