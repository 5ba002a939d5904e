"""The `ssl:` config section: every key is set in the step's configs (configs/steps/ssl_*.yaml), none has a default
in code; a missing, unknown or out-of-range key is one error line naming it."""
from __future__ import annotations

import contextlib
import copy

from ...core import config as core_config
from ...core.errors import WBCError
from ...core.validate import _float, _int, _one_of


def _pair(lo: float, hi: float):
    """A [low, high] range inside [lo, hi]."""
    def check(v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            return f"expected [low, high], got {v!r}"
        bad = _float(v[0], lo, hi) or _float(v[1], lo, hi)
        return bad or (None if v[0] <= v[1] else f"low above high in {list(v)}")
    return check


def _path_or_null(v):
    return None if v is None or (isinstance(v, str) and v.strip()) else f"expected a file path or null, got {v!r}"


def _grad_clip(v):
    return _float(v, 0.0, lo_open=True, null=True)


# key -> check (None: fine); nested sections are checked only where the chosen method / command needs them
COMMON = {
    "method": lambda v: _one_of(v, ("dino", "fastsiam")),
    "images": lambda v: _one_of(v, ("pool", "transductive")),
    "image_list": _path_or_null,
    "cell_filter": lambda v: _one_of(v, ("none", "whiten", "crop")),
    "cell_margin": lambda v: _float(v, 0.0, 0.5),
    "epochs": lambda v: _int(v, 1),
    "batch_size": lambda v: _int(v, 2),
    "lr": lambda v: _float(v, 0.0, lo_open=True),
    "min_lr": lambda v: _float(v, 0.0),
    "weight_decay": lambda v: _float(v, 0.0),
    "warmup_epochs": lambda v: _int(v, 0),
    "grad_clip": _grad_clip,
    "num_workers": lambda v: _int(v, 0),
    "export": lambda v: _one_of(v, ("teacher", "student")),
    "global_crop_size": lambda v: _int(v, 16),
    "global_crop_scale": _pair(0.01, 1.0),
    "local_crop_size": lambda v: _int(v, 16),
    "local_crop_scale": _pair(0.01, 1.0),
    "local_views": lambda v: _int(v, 0),
    "views": lambda v: _int(v, 2),
    "flip_rotate": lambda v: _float(v, 0.0, 1.0),
    "color_jitter": lambda v: _float(v, 0.0, 1.0),
    "gray": lambda v: _float(v, 0.0, 1.0),
    "solarize": lambda v: _float(v, 0.0, 1.0),
    "damage_p": lambda v: _float(v, 0.0, 1.0),
    "damage_max_severity": lambda v: _int(v, 1, 4),
}
SECTIONS = {
    "dino": {
        "hidden_dim": lambda v: _int(v, 1),
        "bottleneck_dim": lambda v: _int(v, 1),
        "out_dim": lambda v: _int(v, 2),
        "teacher_temp": lambda v: _float(v, 0.0, lo_open=True),
        "warmup_teacher_temp": lambda v: _float(v, 0.0, lo_open=True),
        "warmup_teacher_temp_epochs": lambda v: _int(v, 0),
        "student_temp": lambda v: _float(v, 0.0, lo_open=True),
        "center_momentum": lambda v: _float(v, 0.0, 1.0, hi_open=True),
        "momentum": lambda v: _float(v, 0.0, 1.0),  # the teacher's, cosine-scheduled up to 1
        "freeze_last_layer": lambda v: _int(v, 0),
    },
    "fastsiam": {
        "proj_hidden_dim": lambda v: _int(v, 1),
        "proj_dim": lambda v: _int(v, 1),
        "pred_hidden_dim": lambda v: _int(v, 1),
    },
    "select": {
        "labels_per_class": lambda v: None if v is None else _int(v, 1),
        "images_per_prototype": lambda v: _int(v, 1),
        "max_prototypes": lambda v: _int(v, 1),
        "quantile": lambda v: _float(v, 0.0, 1.0),
        "widen": lambda v: _float(v, 0.0, 10.0),
        "batch_size": lambda v: _int(v, 1),
    },
}


def _check(given: dict, rules: dict, prefix: str) -> list[str]:
    out = [f"{prefix}{k}: unknown key (configs/steps/ssl_dino_lite0_cpu.yaml lists every key)"
           for k in sorted(set(given) - set(rules) - set(SECTIONS))]
    for k, check in rules.items():
        if k not in given:
            out.append(f"{prefix}{k}: missing (configs/steps/ssl_dino_lite0_cpu.yaml lists every key)")
        elif (msg := check(given[k])) is not None:
            out.append(f"{prefix}{k}: {msg}")
    return out


def ssl_section(cfg: dict, need: tuple[str, ...] = ()) -> dict:
    """The checked `ssl` section with its method's own section; `need` names other nested ones (`select`)."""
    s = cfg.get("ssl")
    if not isinstance(s, dict) or not s:
        raise WBCError(f"config '{cfg.get('name')}' has no ssl: section (use configs/steps/ssl_*.yaml)")
    bad = _check(s, COMMON, "ssl.")
    method_ok = "method" in s and COMMON["method"](s["method"]) is None
    for name in ((s["method"],) if method_ok else ()) + tuple(need):
        sub = s.get(name)
        bad += [f"ssl.{name}: missing section"] if not isinstance(sub, dict) else \
            _check(sub, SECTIONS[name], f"ssl.{name}.")
    if not bad and s["method"] == "fastsiam" and s["export"] == "teacher":
        bad.append("ssl.export: fastsiam has no teacher (use student)")
    if len(bad) == 1:
        raise WBCError(bad[0])
    if bad:
        raise WBCError(f"{len(bad)} invalid ssl values:\n  " + "\n  ".join(bad))
    return copy.deepcopy(s)


@contextlib.contextmanager
def _ssl_step_section():
    """Lets `load_config` accept the top-level `ssl:` section, as it does the other steps' (core.config.STEP_SECTIONS);
    a no-op once STEP_SECTIONS lists `ssl` itself."""
    before = core_config.STEP_SECTIONS
    if "ssl" not in before:
        core_config.STEP_SECTIONS = before + ("ssl",)
    try:
        yield
    finally:
        core_config.STEP_SECTIONS = before


def load_ssl_config(path, overrides=()) -> dict:
    with _ssl_step_section():
        return core_config.load_config(path, list(overrides))
