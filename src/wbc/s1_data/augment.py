"""albumentations 2 pipelines: geometry, colour / stain jitter and competition-like damage.

`augment.strength` scales every probability and magnitude (but the affine rotation's angle range, whose probability
it scales), so one number dials the whole policy (and `tune-train` can search it). Normalisation happens on the
device, not here: workers ship uint8.
"""
from __future__ import annotations

import albumentations as A
import cv2

from ..core import hooks


def _scaled(v: float, s: float, cap: float = 1.0) -> float:
    return float(min(cap, v * s))


def base_ops(a: dict, s: float) -> list:
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
    for step in hooks.enabled("augment", {"augment": a}):  # optional ops (random background)
        ops += step.ops(a, s)
    lab = a.get("lab") or {}
    if lab.get("stain_p"):
        ops.append(A.HEStain(method="random_preset", intensity_scale_range=tuple(lab["stain_range"]),
                             p=_scaled(lab["stain_p"], s)))
    if lab.get("illuminant_p"):
        ops.append(A.PlanckianJitter(p=_scaled(lab["illuminant_p"], s)))
    if lab.get("gamma_p"):
        ops.append(A.RandomGamma(gamma_limit=(70, 150), p=_scaled(lab["gamma_p"], s)))
    if lab.get("gray_p"):
        ops.append(A.ToGray(p=_scaled(lab["gray_p"], s)))
    co = a.get("color") or {}
    if co.get("p"):
        ops.append(A.OneOf([
            A.HueSaturationValue(hue_shift_limit=co["hue"] * s, sat_shift_limit=co["saturation"] * s,
                                 val_shift_limit=co["value"] * s, p=1.0),
            A.RandomBrightnessContrast(brightness_limit=co["brightness"] * s, contrast_limit=co["contrast"] * s,
                                       p=1.0),
        ], p=_scaled(co["p"], s)))
    return ops


def damage_ops(a: dict, s: float, p: float | None = None) -> list:
    """The damage simulator at the config's chance (or at `p`), as a one-op list (empty when off)."""
    dm = a.get("damage") or {}
    if not dm.get("p"):
        return []
    from .damage import DamageTransform

    # The mix (severity_weights, group_p, kind_weights) is a fitted distribution (`make damage-match`);
    # strength scales only its probability, not its shape.
    return [DamageTransform(max_severity=int(dm["max_severity"]), p=_scaled(dm["p"], s) if p is None else p,
                            severity_weights=dm.get("severity_weights"), group_p=dm.get("group_p"),
                            kind_weights=dm.get("kind_weights"))]


def build_transform(cfg: dict, train: bool) -> A.Compose | None:
    """The training pipeline, or None for evaluation (TTA views are applied on the device)."""
    if not train:
        return None
    a, s = cfg["augment"], float(cfg["augment"]["strength"])
    return A.Compose(base_ops(a, s) + damage_ops(a, s))
