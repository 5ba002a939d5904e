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
    "data.name": lambda v: None if v is None else name_problem(v),  # names folds/ and cache/ files
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
    "ensemble.blend.weights": lambda v: None if v in ("fit", "equal") or (isinstance(v, list) and not any(
        _float(w) for w in v)) else f"expected fit, equal or a list of numbers, got {v!r}",
    "ensemble.members": lambda v: None if isinstance(v, list) else f"expected a list of run folders ([a, b]; a seed "
                                                                   f"group as a list inside it), got {v!r}",
    "predict.adapt_bn": lambda v: _float(v, 0.0, 1.0),
    "predict.adapt_bn_guard": lambda v: _one_of(v, ("balance", "none")),
    "predict.color_tta": lambda v: _one_of(v, (1, 2, 4)),
}


def get_dotted(cfg: dict, dotted: str, default=None):
    """`cfg["a"]["b"]` for "a.b", or `default` where a level is missing."""
    node = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


_MISSING = object()


def type_problems(cfg: dict, defaults: dict, prefix: str = "") -> list[str]:
    """`key: what is wrong` for a value of another kind than its base.yaml default where that default is a number or
    true / false (`augment.flip=abc`, `ensemble.tuning.n_trials=abc`); null is left to the key's user (often "off")."""
    out = []
    for k, d in defaults.items():
        key, v = prefix + str(k), cfg.get(k, _MISSING) if isinstance(cfg, dict) else _MISSING
        if v is _MISSING or v is None or key in RULES:
            continue
        if isinstance(d, dict):
            out += type_problems(v, d, key + ".") if isinstance(v, dict) else []
        elif isinstance(d, bool):
            if not isinstance(v, bool):
                out.append(f"{key}: expected true or false, got {v!r}")
        elif isinstance(d, (int, float)) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            out.append(f"{key}: expected a number, got {v!r}")
    return out


def problems(cfg: dict, defaults: dict | None = None) -> list[str]:
    """`key: what is wrong` for every value a rule refuses (and, given base.yaml's `defaults`, of the wrong kind)."""
    out = type_problems(cfg, defaults) if defaults else []
    for key, check in RULES.items():
        v = get_dotted(cfg, key, _MISSING)
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


def check_values(cfg: dict, where: str, defaults: dict | None = None) -> None:
    """Raise one WBCError listing every refused value, one line each."""
    bad = problems(cfg, defaults)
    if len(bad) == 1:
        raise WBCError(f"{where}: {bad[0]}")
    if bad:
        raise WBCError(f"{where}: {len(bad)} invalid config values:\n  " + "\n  ".join(bad))
