"""Optional steps that the main path calls without importing them.

Each hook point of the main path lists the optional steps that can plug into it: the config switch that turns a
step on, and the module that implements it, imported only when the switch is on. So the main path (data -> folds ->
train -> predict -> ensemble -> refine -> submit) stays lean, a step measured flat or harmful stays off and out of
it, and `tests/test_architecture.py` checks that no main-path module imports an optional one.

Hook points and what a module must provide there:
- `preprocess` (image cache, `s1_data/preprocess.py`): `cache_tag(cfg) -> str` (a suffix of the cache folder: images
  made another way live elsewhere) and `build(cfg, pool_images_fn) -> f(images, split) -> images`.
- `augment` (training transform, `s1_data/augment.py`): `ops(augment_cfg, strength) -> list` of albumentations
  transforms, applied after the geometry and before the colour ops.
- `model_build` (`models/factory.py`): `convert(model, model_cfg) -> model`, applied after any pretrained weights.
- `train_rows` (`s3_train/inputs.py`): `load(cfg, classes, pool, holdout, test) -> ExtraRows | None`, extra labelled
  training rows drawn from the unlabelled splits.
- `train_batch` (`s3_train/step.py`): `build(cfg, counts, seed) -> BatchHook`, which may replace the training
  transform and changes each stage-1 batch and its loss (at most one such step at a time).
- `predict_adapt` (`s4_predict/fold.py`): `adapt(model, images, cfg, seed, desc, **predict_kw) -> model`, a model
  adapted to the images it is about to predict.
"""
from __future__ import annotations

import copy
import importlib
from types import ModuleType
from typing import Callable

from .config import set_dotted
from .errors import WBCError


def _mix_on(cfg: dict) -> bool:
    m = cfg["train"].get("mix") or {}
    return float(m.get("mixup_alpha") or 0) != 0 or float(m.get("cutmix_alpha") or 0) != 0  # < 0: its error


HOOKS: dict[str, list[tuple[str, Callable[[dict], bool], str]]] = {
    "preprocess": [
        ("data.restore", lambda c: bool(c["data"].get("restore")), "wbc.optional.restore.preprocess"),
        ("data.stain_norm", lambda c: bool(c["data"].get("stain_norm")), "wbc.optional.stain"),
        ("data.hematoxylin", lambda c: bool(c["data"].get("hematoxylin")), "wbc.optional.hematoxylin"),
    ],
    "augment": [
        ("augment.background", lambda c: float((c["augment"].get("background") or {}).get("p") or 0) != 0,
         "wbc.optional.background"),
    ],
    "model_build": [
        ("model.norm", lambda c: bool(c["model"].get("norm")), "wbc.optional.norm"),
    ],
    "train_rows": [
        ("data.pseudo_labels", lambda c: bool(c["data"].get("pseudo_labels")), "wbc.optional.pseudo.rows"),
    ],
    "train_batch": [
        ("train.mix", _mix_on, "wbc.optional.mix"),
        ("train.consistency", lambda c: float((c["train"].get("consistency") or {}).get("weight") or 0) != 0,
         "wbc.optional.consistency"),
    ],
    "predict_adapt": [
        ("predict.adapt_bn", lambda c: float(c["predict"].get("adapt_bn") or 0) != 0, "wbc.optional.adapt_bn"),
    ],
}


def enabled(point: str, cfg: dict) -> list[ModuleType]:
    """The modules plugged into `point` whose switch `cfg` turns on, in the order listed above."""
    return [importlib.import_module(module) for _, on, module in HOOKS[point] if on(cfg)]


def single(point: str, cfg: dict) -> ModuleType | None:
    """The one module plugged into `point` (None when none is on); two at once is a config error."""
    on = switched_on(point, cfg)
    if len(on) > 1:
        raise WBCError(f"{' and '.join(on)} cannot be combined: each changes the training batch and its loss")
    mods = enabled(point, cfg)
    return mods[0] if mods else None


def without(point: str, cfg: dict) -> dict:
    """A copy of `cfg` with every step of `point` switched off (their switches are booleans: `preprocess`)."""
    out = copy.deepcopy(cfg)
    for switch, _, _ in HOOKS[point]:
        set_dotted(out, switch.split("."), False)
    return out


def switched_on(point: str, cfg: dict) -> list[str]:
    """The switches of `point` that `cfg` turns on, without importing their modules."""
    return [switch for switch, on, _ in HOOKS[point] if on(cfg)]
