"""Random background (`augment.background`): another lab's plasma and red cells behind the same white cell.

Labs differ in what surrounds the cell as much as in the cell: plasma tint, red-cell colour and density, the
camera's white point. A model that learnt the home lab's background as part of a class reads another lab's as a
different cell. With chance `p` the central cell is segmented (the morphology step's `segment`), and everything
outside it gets a new colour in CIELAB: its mean moved by up to `shift` in L, a and b, its texture (the red cells)
scaled by a factor drawn from `texture` (0 = flat plasma, 1 = as it was). The cell itself is untouched; the edge is
feathered over a few pixels so that no seam teaches the model where the mask was. An image the segmentation fails on
passes unchanged. Plugged into the training transform through the `augment` hook point (`wbc.core.hooks`).
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from ..s6_refine.morphology import segment


def replace_background(img: np.ndarray, rng: np.random.Generator, shift: float, texture: tuple[float, float],
                       margin: float) -> tuple[np.ndarray, bool]:
    """`img` (RGB uint8) with a re-coloured background, and whether the cell was found (False: `img` unchanged)."""
    seg = segment(img)
    if not seg.ok:
        return img, False
    side = min(img.shape[:2])
    grow = max(1, int(round(margin * side)))
    cell = cv2.dilate(seg.cell.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    # alpha 1 on the cell, 0 in the background, a soft ramp of about `grow` pixels between
    alpha = cv2.GaussianBlur(cell.astype(np.float32), (0, 0), grow / 2 + 0.5)[..., None]
    alpha = np.maximum(alpha, seg.cell[..., None].astype(np.float32))
    bg = cell == 0
    if bg.sum() < 16:
        return img, False
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
    mean = lab[bg].mean(0)
    k = rng.uniform(*texture)
    new = (mean + rng.uniform(-shift, shift, 3)) + k * (lab - mean)
    new = cv2.cvtColor(new.clip(0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB).astype(np.float32)
    out = alpha * img.astype(np.float32) + (1 - alpha) * new
    return out.round().clip(0, 255).astype(np.uint8), True


class RandomBackground(A.ImageOnlyTransform):
    """`replace_background` at chance `p`; seeded by `A.Compose(seed=...)` like every op of the pipeline."""

    def __init__(self, shift: float = 20.0, texture: tuple[float, float] = (0.0, 1.3), margin: float = 0.03,
                 p: float = 0.5):
        super().__init__(p=p)
        if shift < 0 or not 0 <= texture[0] <= texture[1] or margin < 0:
            raise ValueError(f"augment.background: shift >= 0, 0 <= texture[0] <= texture[1] and margin >= 0, got "
                             f"shift {shift}, texture {list(texture)}, margin {margin}")
        self.shift, self.texture, self.margin = float(shift), (float(texture[0]), float(texture[1])), float(margin)

    def get_params(self) -> dict:
        return {"seed": self.py_random.getrandbits(63)}

    def apply(self, img: np.ndarray, seed: int = 0, **params) -> np.ndarray:
        return replace_background(img, np.random.default_rng(seed), self.shift, self.texture, self.margin)[0]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("shift", "texture", "margin")


def ops(a: dict, s: float) -> list:
    """The `augment` hook point: the op for the augment block `a` at strength `s` (scales chance and shift)."""
    b = a["background"]
    return [RandomBackground(shift=float(b["shift"]) * s, texture=tuple(b["texture"]), margin=float(b["margin"]),
                             p=min(1.0, float(b["p"]) * s))]
