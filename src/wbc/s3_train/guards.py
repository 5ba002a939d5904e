"""Stop or warn about a run that is going wrong: non-finite losses and gradients, and a finite collapse."""
from __future__ import annotations

import math

from ..core.errors import TrainingDiverged


def check_finite(ep: dict, scaler, where: str, clipped: bool = False) -> None:
    """Stop a diverged run with one line. An fp16 GradScaler skips steps with inf gradients by design; without it
    such a step has already written NaN into the weights."""
    bad = ep["nonfinite_steps"] if not scaler.is_enabled() else 0
    if math.isfinite(ep["loss"]) and not bad:
        return
    raise TrainingDiverged(f"{where}: training diverged (loss {ep['loss']:.4g}, {bad} steps with non-finite "
                           f"gradients, finite-step gradient norm mean {ep['grad_norm']:.3g} / max "
                           f"{ep['grad_norm_max']:.3g}); {_stabilise(clipped)}. Checkpoints of the epochs before "
                           "are kept")


def collapse_warning(history: list[dict], where: str, clipped: bool = False) -> str | None:
    """A warning when the newest stage-1 epoch's training loss is back above the stage's first, or when two stage-1
    epochs running predicted every validation image as one class: finite collapses, which `check_finite` cannot see
    (Swin-T at lr 1e-3 under bf16 did the first at CPU scale, a GroupNorm Lite0 the second; neither recovered)."""
    s1 = [r for r in history if r["stage"] == 1]
    if len(s1) < 2 or history[-1]["stage"] != 1:
        return None
    if all(r.get("val_classes_predicted") == 1 for r in s1[-2:]):
        return (f"{where}: every validation image was predicted as one class in the last two epochs; the run has "
                f"collapsed: {_stabilise(clipped)}")
    if not s1[-1]["train_loss"] > s1[0]["train_loss"]:
        return None
    return (f"{where}: training loss {s1[-1]['train_loss']:.4g} is back above its first epoch's "
            f"{s1[0]['train_loss']:.4g}; the run is collapsing: {_stabilise(clipped)}")


def _stabilise(clipped: bool) -> str:
    return f"lower train.lr, lengthen train.warmup_epochs or {'lower' if clipped else 'set'} train.grad_clip"
