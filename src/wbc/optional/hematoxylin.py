"""Hematoxylin-channel input (`data.hematoxylin`): each image becomes the grey map of its nuclear stain, so that a
model sees chromatin and nuclear shape rather than one laboratory's stain colours and exposure.

Colour deconvolution with scikit-image's `rgb2hed` (the fixed Ruifrok-Johnston vectors; its haematoxylin vector is
the blue-purple absorber that Romanowsky stains put in nuclei and granules). The haematoxylin optical density is
stretched between its `low` and `high` percentiles per image, so another lab's stain strength and lamp drop out,
and written dark on light (like the stain) to all three channels for an ImageNet backbone. Applied once, when the
image cache is built, and by `classify` / `crosslab` to new images: a run trained on it must see it everywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.color import rgb2hed

from ..core.errors import WBCError
from ..core.io import fingerprint

LOW, HIGH = 1.0, 99.0  # percentiles of an image's haematoxylin density mapped to white and black


def hematoxylin(img: np.ndarray, low: float = LOW, high: float = HIGH) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 grey haematoxylin map (dark = much stain)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise WBCError(f"hematoxylin input needs HxWx3 uint8 RGB images, got {img.dtype} {img.shape}")
    h = rgb2hed(img)[..., 0]
    lo, hi = np.percentile(h, [low, high])
    if hi - lo < 1e-6:  # a blank image has no stain to map: mid-grey, never a division by zero
        return np.full_like(img, 128)
    grey = 255.0 * (1.0 - np.clip((h - lo) / (hi - lo), 0.0, 1.0))
    return np.repeat(grey.round().astype(np.uint8)[..., None], 3, axis=2)


def cache_tag(cfg: dict) -> str:
    """Images made by this code live under its hash."""
    return "_hema-" + fingerprint([Path(__file__)])


def build(cfg: dict, pool_images_fn=None):
    """`f(images, split)` mapping every image; nothing is fitted, so new images need no reference."""

    def to_hematoxylin(images, split):
        return np.stack([hematoxylin(im) for im in images]) if len(images) else images

    return to_hematoxylin
