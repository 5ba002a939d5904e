"""The restorer as a cache-time preprocessing step (`data.restore`, the `preprocess` hook point): damaged images
the gate flags are restored before classification; phase1 is clean and passes unchanged."""
from __future__ import annotations

from ...core.config import resolve_path
from ...core.io import fingerprint
from ...core.runtime import pick_device
from .pix2pix import RESTORER_FILES, Restorer


def cache_tag(cfg: dict) -> str:
    """A retrained restorer never meets its predecessor's images: the cache lives under its files' hash."""
    return "_restored-" + fingerprint([resolve_path(cfg["data"]["restore_dir"]) / n for n in RESTORER_FILES])


def build(cfg: dict, pool_images_fn=None):
    restorer = Restorer.load(resolve_path(cfg["data"]["restore_dir"]), device=pick_device(cfg))

    def restore(images, split):
        if split == "phase1":
            return images  # clean; any other images (phase2, a folder to classify) go through the gate
        out, _, _ = restorer(images)
        return out

    return restore
