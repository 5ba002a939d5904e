"""Specialists: runs trained on a confusable group of classes only (`data.subset_classes`, e.g. BNE / SNE or
the PMY / MY / MMY maturation series), composed with the full-class blend (`ensemble.specialists`).

The blend P gives the group's total probability P(G) and a split inside it, P(c | G); a specialist S gives its
own split S(c) of the group. The composition keeps P(G) and every class outside the group and mixes the split:

    P'(c) = P(G) * ((1 - w) * P(c | G) + w * S(c))    for c in G.

w in [0, 1] is fitted on OOF (`ensemble.specialist_fit`): `macro_f1` (default) takes the best of a grid of 21 values
for the argmax's macro-F1; `log_loss` minimises the blend's class-balanced log-loss (convex in w). Why macro-F1 here,
when the blend weights use the log-loss: on PBC-LT the log-loss gave w = 0 to specialists whose w = 0.55-0.6 raised
nested macro-F1 by 0.016-0.020 (docs/RESULTS.md); a specialist trained on its group's prior is calibrated unlike the
blend. A grid can chase noise, so `nested_check` refits everything on K-1 folds and the ensemble keeps the specialists
only when they win on the held-out folds. Several specialists apply in the listed order, each fitted on the output
of the ones before it. A list of runs (other seeds of one specialist) is one specialist, their equal-weight mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from ..core.config import resolve_path
from ..core.errors import WBCError
from ..core.io import Probs
from ..core.metrics import macro_f1
from ..core.run_folder import require_complete
from .blend import (
    Member,
    _load,
    _reorder_classes,
    _same_column,
    _same_folds,
    _same_ids,
    combine,
    fit_weights,
    only_folds,
    seed_means,
)
from .decision import EPS


@dataclass
class Specialist:
    name: str
    path: Path
    group: list[int]  # its classes, as column indices of the members' class order
    oof: Probs  # aligned to the first member's IDs; columns = the group's classes in the members' order
    eval: Probs | None
    test: Probs
    parts: tuple[Path, ...] = ()  # the runs of a seed group; empty for one run


def load_specialist(entry, ref: Member, folds: list[int] | None = None) -> Specialist:
    """One `ensemble.specialists` entry: a run folder, or a list of them (seeds of one specialist, averaged); with
    `folds`, only those folds' OOF rows, as for the members."""
    if isinstance(entry, (str, Path)):
        return _load_specialist(entry, ref, folds)
    if not isinstance(entry, (list, tuple)) or not entry or not all(isinstance(e, (str, Path)) for e in entry):
        raise WBCError(f"ensemble.specialists: {entry!r} is not a run folder or a list of run folders")
    runs = [_load_specialist(e, ref, folds) for e in entry]
    for r in runs[1:]:
        if r.group != runs[0].group:
            names = ", ".join(ref.oof.classes[i] for i in r.group)
            raise WBCError(f"{r.path / 'oof.csv'}: classes {names} differ from those of {runs[0].path / 'oof.csv'} "
                           "(a seed group's runs must share their classes)")
    if len(runs) == 1:
        return runs[0]
    return Specialist("+".join(Path(r.name).name for r in runs), runs[0].path, runs[0].group, *seed_means(runs),
                      tuple(r.path for r in runs))


def _load_specialist(run_dir, ref: Member, folds: list[int] | None = None) -> Specialist:
    """A specialist run folder checked against the first (already aligned) member: same IDs, folds and labels,
    and classes that are a proper subset of the members' classes."""
    path = resolve_path(run_dir)
    if not path.is_dir():
        raise WBCError(f"{path}: specialist is not a run folder")
    require_complete(path, "make predict")
    oof_path = path / "oof.csv"
    oof = _load(oof_path)
    if oof.folds is None:
        raise WBCError(f"{oof_path}: no fold column (is it an out-of-fold file?)")
    oof = only_folds(oof, folds, oof_path)
    classes = ref.oof.classes
    if not set(oof.classes) < set(classes) or len(oof.classes) < 2:
        raise WBCError(f"{oof_path}: a specialist's classes ({', '.join(oof.classes)}) must be two or more of the "
                       f"members' classes ({', '.join(classes)}), not all of them")
    order = [c for c in classes if c in oof.classes]
    ref_oof = ref.path / "oof.csv"
    _same_folds(oof, ref.oof, oof_path, ref_oof)
    aligned = _same_ids(_reorder_classes(oof, order, oof_path), ref.oof, oof_path, ref_oof)
    _same_column(aligned, ref.oof, "folds", oof, oof_path, ref_oof)
    _same_column(aligned, ref.oof, "labels", oof, oof_path, ref_oof)

    def split(name: str, ref_probs: Probs | None) -> Probs | None:
        if ref_probs is None:
            return None
        f = path / f"{name}.csv"
        if not f.exists():
            raise WBCError(f"{f}: missing, but the members have {name} predictions")
        return _same_ids(_reorder_classes(_load(f), order, f), ref_probs, f, ref.path / f"{name}.csv")

    return Specialist(str(run_dir), path, [classes.index(c) for c in order], aligned, split("eval", ref.eval),
                      split("test", ref.test))


def compose(probs: np.ndarray, spec: np.ndarray, group: list[int], w: float) -> np.ndarray:
    """The blend with its split of `group` mixed towards the specialist's (module doc); rows still sum to 1."""
    out = np.array(probs, dtype=np.float64, copy=True)
    pg = out[:, group].sum(1, keepdims=True)
    cond = out[:, group] / np.clip(pg, EPS, None)
    out[:, group] = pg * ((1.0 - w) * cond + w * np.asarray(spec, dtype=np.float64))
    return out


FITS = ("macro_f1", "log_loss")
GRID = np.linspace(0.0, 1.0, 21)


def fit_weight(probs: np.ndarray, spec: np.ndarray, group: list[int], y: np.ndarray,
               sample_weight: np.ndarray | None = None, fit: str = "macro_f1") -> float:
    """w in [0, 1] for `compose` (module doc); images weighted by `sample_weight` (test-shift weights)."""
    y = np.asarray(y)
    if fit == "macro_f1":  # every image counts: a non-group image may be predicted as a group class
        scores = [macro_f1(y, compose(probs, spec, group, w).argmax(1), probs.shape[1], sample_weight) for w in GRID]
        return float(GRID[int(np.argmax(scores))])  # ties: the smallest w
    if fit != "log_loss":
        raise WBCError(f"ensemble.specialist_fit: '{fit}' is not one of {', '.join(FITS)}")
    rows = np.flatnonzero(np.isin(y, group))
    if not len(rows):
        return 0.0
    iw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
    sw = (iw / np.bincount(y, iw)[y])[rows]
    p, s, yr = probs[rows], np.asarray(spec)[rows], y[rows]

    def loss(w: float) -> float:
        return float(-(sw * np.log(np.clip(compose(p, s, group, w)[np.arange(len(rows)), yr], EPS, None))).sum())

    res = minimize_scalar(loss, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-4})
    return float(min((0.0, 1.0, float(res.x)), key=loss))  # bounded Brent never tries the ends themselves


def fit_specialists(probs: np.ndarray, specs: list[np.ndarray], groups: list[list[int]], y: np.ndarray,
                    sample_weight: np.ndarray | None = None, fit: str = "macro_f1") -> list[float]:
    """One weight per specialist, each fitted on the composition of the ones before it."""
    weights = []
    for s, g in zip(specs, groups):
        weights.append(fit_weight(probs, s, g, y, sample_weight, fit))
        probs = compose(probs, s, g, weights[-1])
    return weights


def apply_specialists(probs: np.ndarray, specs: list[np.ndarray], groups: list[list[int]],
                      weights: list[float]) -> np.ndarray:
    for s, g, w in zip(specs, groups, weights):
        probs = compose(probs, s, g, w)
    return probs


def nested_check(member_probs: list[np.ndarray], y: np.ndarray, folds: np.ndarray, specs: list[np.ndarray],
                 groups: list[list[int]], *, weights: np.ndarray | None, blend_space: str,
                 sample_weight: np.ndarray | None = None, fit: str = "macro_f1") -> dict:
    """Do the specialists earn their place out of sample? For each OOF fold, fit the blend weights
    (`weights=None`) and the specialists' weights on the other folds; score the held-out folds' argmax of the
    blend without and with the specialists (pooled macro-F1, weighted by `sample_weight`)."""
    y, folds = np.asarray(y), np.asarray(folds)
    n_cls = member_probs[0].shape[1]
    plain, composed, fold_weights = np.full(len(y), -1), np.full(len(y), -1), {}
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        sw_tr = None if sample_weight is None else sample_weight[tr]
        w = fit_weights([p[tr] for p in member_probs], y[tr], blend_space, sw_tr) if weights is None else weights
        probs = combine(member_probs, w, blend_space)
        sws = fit_specialists(probs[tr], [s[tr] for s in specs], groups, y[tr], sw_tr, fit)
        plain[te] = probs[te].argmax(1)
        composed[te] = apply_specialists(probs[te], [s[te] for s in specs], groups, sws).argmax(1)
        fold_weights[int(k)] = sws
    return {"without": macro_f1(y, plain, n_cls, sample_weight), "with": macro_f1(y, composed, n_cls, sample_weight),
            "fold_weights": fold_weights}
