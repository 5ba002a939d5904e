"""Value checks of a resolved config, before any work: a mistyped or out-of-range value is one line per problem,
not a traceback after the data has loaded (or after a whole training, as `predict.tta=3` once was)."""
from __future__ import annotations

import math

from .errors import WBCError

VIEWS = (1, 2, 4, 8)  # dihedral TTA views


def _int(v, lo: int | None = None, hi: int | None = None) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int):
        return f"expected an integer, got {v!r}"
    if lo is not None and v < lo:
        return f"must be >= {lo}, got {v}"
    if hi is not None and v > hi:
        return f"must be <= {hi}, got {v}"
    return None


def _float(v, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           null: bool = False) -> str | None:
    if v is None and null:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return f"expected a number, got {v!r}"
    if lo is not None and (v <= lo if lo_open else v < lo):
        return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
    if hi is not None and (v >= hi if hi_open else v > hi):
        return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
    return None


def _one_of(v, choices) -> str | None:
    return None if v in choices else f"expected one of {', '.join(map(str, choices))}, got {v!r}"


def name_problem(v) -> str | None:
    """A run or submission name must be a plain file name, so nothing is written outside outputs/ or submissions/."""
    if not isinstance(v, str) or not v.strip() or v.startswith(".") or any(c in v for c in "/\\\0"):
        return f"a name is one plain file name (no '/', no leading '.'), got {v!r}"
    return None


# dotted key -> check of its value (keys a section lacks are left to the unknown-key check)
RULES = {
    "name": name_problem,
    "seed": lambda v: _int(v, 0),
    "data.image_size": lambda v: _int(v, 8, 4096),
    "data.center_crop": lambda v: _float(v, 0.0, 1.0, lo_open=True),
    "data.max_image_pixels": lambda v: _int(v, 1),
    "folds.n_folds": lambda v: _int(v, 2),
    "folds.seed": lambda v: _int(v, 0),
    "model.drop_rate": lambda v: _float(v, 0.0, 1.0, hi_open=True),
    "model.drop_path_rate": lambda v: _float(v, 0.0, 1.0, hi_open=True),
    "train.epochs": lambda v: _int(v, 0),
    "train.batch_size": lambda v: _int(v, 1),
    "train.lr": lambda v: _float(v, 0.0, lo_open=True),
    "train.min_lr": lambda v: _float(v, 0.0),
    "train.weight_decay": lambda v: _float(v, 0.0),
    "train.warmup_epochs": lambda v: _int(v, 0),
    "train.grad_clip": lambda v: _float(v, 0.0, null=True),
    "train.ema_decay": lambda v: _float(v, 0.0, 1.0, lo_open=True, hi_open=True),
    "train.num_workers": lambda v: _int(v, 0),
    "train.checkpoint_every_s": lambda v: _float(v, 0.0, null=True),
    "train.val_tta": lambda v: _one_of(v, VIEWS),
    "train.tracker": lambda v: _one_of(v, ("tensorboard", "none")),
    "train.sampler.type": lambda v: _one_of(v, ("none", "sqrt", "power", "balanced", "effective")),
    "train.loss.type": lambda v: _one_of(v, ("ce", "focal", "balanced_softmax", "logit_adjusted")),
    "train.loss.label_smoothing": lambda v: _float(v, 0.0, 1.0, hi_open=True),
    "train.loss.class_weight": lambda v: _one_of(v, ("none", "inverse", "effective")),
    "train.stage2.epochs": lambda v: _int(v, 0),
    "train.stage2.lr": lambda v: _float(v, 0.0, lo_open=True),
    "augment.strength": lambda v: _float(v, 0.0),
    "augment.damage.p": lambda v: _float(v, 0.0),  # above 1 with augment.strength < 1 (capped at 1 when used)
    "augment.damage.max_severity": lambda v: _int(v, 1, 4),
    "predict.tta": lambda v: _one_of(v, VIEWS),
    "predict.batch_size": lambda v: _int(v, 1),
    "predict.weights": lambda v: _one_of(v, ("best", "last")),
    "predict.adapt_bn": lambda v: _float(v, 0.0, 1.0),
}


def _get(cfg: dict, dotted: str):
    node = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return _MISSING
        node = node[k]
    return node


_MISSING = object()


def problems(cfg: dict) -> list[str]:
    """`key: what is wrong` for every value a rule refuses."""
    out = []
    for key, check in RULES.items():
        v = _get(cfg, key)
        if v is _MISSING:
            continue
        msg = check(v)
        if msg:
            out.append(f"{key}: {msg}")
    t = cfg.get("train") or {}
    if not out and isinstance(t.get("epochs"), int) and isinstance((t.get("stage2") or {}).get("epochs"), int) \
            and t["epochs"] + t["stage2"]["epochs"] < 1:
        out.append("train.epochs: stage 1 and stage 2 together need at least one epoch")
    return out


def check_values(cfg: dict, where: str) -> None:
    """Raise one WBCError listing every refused value, one line each."""
    bad = problems(cfg)
    if len(bad) == 1:
        raise WBCError(f"{where}: {bad[0]}")
    if bad:
        raise WBCError(f"{where}: {len(bad)} invalid config values:\n  " + "\n  ".join(bad))
