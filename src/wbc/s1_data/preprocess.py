"""Optional preprocessing applied once, when the image cache is built: the steps plugged into the `preprocess` hook
point (`wbc.core.hooks`: Pix2Pix restoration of the images the damage gate flags, Macenko stain normalisation), each
turned on by its config switch. Off by default: both measured harmful or flat (docs/RESULTS.md)."""
from __future__ import annotations

from ..core import hooks


def cache_tag(cfg: dict) -> str:
    """The cache folder's suffix for the enabled steps: images preprocessed another way live in another folder."""
    return "".join(m.cache_tag(cfg) for m in hooks.enabled("preprocess", cfg))


def build_preprocess(cfg: dict, pool_images_fn=None):
    """`f(images, split) -> images` for `cache.split_images`, or None when no step is enabled.

    `pool_images_fn()` returns the clean training images a step may fit itself on (the stain reference)."""
    steps = [m.build(cfg, pool_images_fn) for m in hooks.enabled("preprocess", cfg)]
    if not steps:
        return None

    def run(images, split):
        for step in steps:
            images = step(images, split)
        return images

    return run
