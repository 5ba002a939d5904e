"""Damage score + gate (`score`) and the Pix2Pix restorer (`pix2pix.Restorer`); see docs/restore.md."""
from .score import Gate, damage_score, damage_scores, fit_gate

__all__ = ["Gate", "Restorer", "damage_score", "damage_scores", "fit_gate"]


def __getattr__(name: str):
    # torch and segmentation-models-pytorch load only when the restorer itself is wanted.
    if name == "Restorer":
        from .pix2pix import Restorer

        return Restorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
