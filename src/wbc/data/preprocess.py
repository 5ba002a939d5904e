"""Optional preprocessing applied once, when the image cache is built: Macenko stain normalisation
(reference fitted on the training pool) and Pix2Pix restoration of images the damage gate flags."""
from __future__ import annotations

import json

import numpy as np

from ..config import resolve_path
from ..errors import WBCError
from ..io import write_json
from ..runtime import pick_device


def build_preprocess(cfg: dict, pool_images_fn=None):
    """`f(images, split) -> images` for `cache.split_images`, or None when nothing is enabled.

    `pool_images_fn()` returns clean training images to fit the stain reference on (phase1 by default), when the
    cache has none yet; without it, the saved reference must exist.
    """
    d = cfg["data"]
    steps = []
    if d.get("restore"):
        from ..restore import Restorer

        restorer = Restorer.load(resolve_path(d["restore_dir"]), device=pick_device(cfg))

        def restore(images, split):
            if split == "phase1":
                return images  # clean; any other images (phase2, a folder to classify) go through the gate
            out, _, _ = restorer(images)
            return out

        steps.append(restore)
    if d.get("stain_norm"):
        from .cache import cache_dir
        from .stain import MacenkoNormalizer

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

        steps.append(stain)
    if not steps:
        return None

    def run(images, split):
        for step in steps:
            images = step(images, split)
        return images

    return run
