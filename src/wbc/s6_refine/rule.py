"""Rare-class rescue rules on top of the ensemble's decisions, fitted on out-of-fold predictions.

Hard rule: a row moves from its base decision to rare class r only when every gate of r is open:
  1. the ensemble agrees enough: p_r >= ratio_r * max_c p_c;
  2. the morphology agrees: Mahalanobis distance to r's Gaussian <= maha_r;
  3. the shape fits (when r's gate uses it): each of r's most discriminating shape features (lobes,
     constriction, spikiness) lies inside r's central interval.
Several rare classes open: the one with the largest p_r / max p wins. A row without morphology
(failed segmentation) has every gate closed. Thresholds are stored as absolute values (distances,
feature intervals) but searched as quantiles of r's own OOF values, so ranges mean the same in every fold.

Soft rule: log p'_c = log p_c + w * (LL_c - max_c' LL_c'), LL the morphology log-likelihood, then the
base decision (tuned rule or argmax) on p'. One weight, picked from a grid on OOF.

Everything is fitted to the OOF macro-F1; `nested` refits on K-1 folds and scores the held-out one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import softmax

from ..core.errors import WBCError
from ..core.metrics import macro_f1
from .gaussian import ClassGaussians, crossfit

EPS = 1e-12
Decide = Callable[[np.ndarray], np.ndarray]


@dataclass
class Evidence:
    """What the rules see for a set of rows."""

    probs: np.ndarray   # (n, C) ensemble probabilities
    base: np.ndarray    # (n,) base decisions (tuned rule or argmax)
    dist: np.ndarray    # (n, C) Mahalanobis distances, NaN where there is no morphology
    loglik: np.ndarray  # (n, C) morphology log-likelihoods, NaN likewise
    shape: np.ndarray   # (n, S) raw shape features for the shape gate
    shape_names: list[str]

    def subset(self, idx) -> "Evidence":
        return Evidence(self.probs[idx], self.base[idx], self.dist[idx], self.loglik[idx], self.shape[idx],
                        self.shape_names)


# ---------------------------------------------------------------- hard rule

def apply_hard(ev: Evidence, params: dict, classes: list[str]) -> np.ndarray:
    """Refined class indices. `params["gates"]`: {class: {"ratio", "maha", "shape": {feature: [lo, hi]}}};
    a class not listed (or an empty dict) never receives a row."""
    pred = ev.base.copy()
    top = np.maximum(ev.probs.max(1), EPS)
    best = np.zeros(len(pred))
    chosen = np.full(len(pred), -1)
    with np.errstate(invalid="ignore"):
        for name, g in params.get("gates", {}).items():
            c = classes.index(name)
            score = ev.probs[:, c] / top
            # a row already in an open rare class competes with it too (no move to a less likely one)
            gate = (score >= g["ratio"]) & (ev.dist[:, c] <= g["maha"])
            for feat, (lo, hi) in g.get("shape", {}).items():
                x = ev.shape[:, ev.shape_names.index(feat)]
                gate &= (x >= lo) & (x <= hi)
            win = gate & (score > best)
            chosen[win], best[win] = c, score[win]
    pred[chosen >= 0] = chosen[chosen >= 0]
    return pred


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC of pos vs neg (ties half)."""
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    allv = np.concatenate([pos, neg])
    ranks = np.empty(len(allv))
    order = np.argsort(allv, kind="mergesort")
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        tie = allv == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def discriminating_shapes(ev: Evidence, y: np.ndarray, c: int, top: int) -> list[str]:
    """The `top` shape features that best separate class c from the rest (largest |AUC - 0.5|)."""
    scored = []
    for j, name in enumerate(ev.shape_names):
        x = ev.shape[:, j]
        ok = np.isfinite(x)
        scored.append((abs(_auc(x[ok & (y == c)], x[ok & (y != c)]) - 0.5), name))
    scored.sort(key=lambda t: -t[0])
    return [name for s, name in scored[:top] if s > 0]


def fit_hard(ev: Evidence, y: np.ndarray, classes: list[str], rare: list[str], search: dict,
             n_trials: int = 200, seed: int = 0, shape_top: int = 2) -> tuple[dict, float]:
    """Optuna (TPE, seeded) search of the gates on the macro-F1 of `ev`'s rows; trial 0 is "every gate
    closed", so the result never scores below the base decisions on these rows."""
    import optuna

    n_cls = len(classes)
    stats = {}
    for name in rare:
        c = classes.index(name)
        d = ev.dist[(y == c), c]
        d = d[np.isfinite(d)]
        if len(d) == 0:
            continue
        shapes = discriminating_shapes(ev, y, c, shape_top)
        vals = {f: ev.shape[(y == c), ev.shape_names.index(f)] for f in shapes}
        stats[name] = (d, {f: v[np.isfinite(v)] for f, v in vals.items()})

    def build(p: dict) -> dict:
        gates = {}
        for name, (d, vals) in stats.items():
            if not p[f"{name}.use"]:
                continue
            g = {"ratio": p[f"{name}.ratio"], "maha": float(np.quantile(d, p[f"{name}.maha_q"])), "shape": {}}
            if p[f"{name}.shape"]:
                q = p[f"{name}.shape_q"]
                g["shape"] = {f: [float(np.quantile(v, q)), float(np.quantile(v, 1 - q))]
                              for f, v in vals.items() if len(v)}
            gates[name] = g
        return {"gates": gates, "search": dict(p)}

    def objective(trial):
        p = {}
        for name in stats:
            p[f"{name}.use"] = trial.suggest_categorical(f"{name}.use", [False, True])
            p[f"{name}.ratio"] = trial.suggest_float(f"{name}.ratio", *search["ratio"], log=True)
            p[f"{name}.maha_q"] = trial.suggest_float(f"{name}.maha_q", *search["maha_quantile"])
            p[f"{name}.shape"] = trial.suggest_categorical(f"{name}.shape", [False, True])
            p[f"{name}.shape_q"] = trial.suggest_float(f"{name}.shape_q", *search["shape_quantile"])
        return macro_f1(y, apply_hard(ev, build(p), classes), n_cls)

    if not stats:
        return {"gates": {}, "search": {}}, macro_f1(y, ev.base, n_cls)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    closed = {}
    for name in stats:
        closed.update({f"{name}.use": False, f"{name}.ratio": search["ratio"][1],
                       f"{name}.maha_q": search["maha_quantile"][0], f"{name}.shape": False,
                       f"{name}.shape_q": search["shape_quantile"][0]})
    study.enqueue_trial(closed)
    study.optimize(objective, n_trials=max(1, n_trials))
    params = build(study.best_trial.params)
    return params, float(study.best_value)


# ---------------------------------------------------------------- soft rule

def soft_probs(ev: Evidence, weight: float) -> np.ndarray:
    """Ensemble probabilities times the morphology likelihood^weight (rows without morphology unchanged)."""
    ll = ev.loglik
    ok = ~np.isnan(ll).any(1)
    rel = np.zeros_like(ll)
    if ok.any():
        part = ll[ok]
        finite = np.isfinite(part)
        # a class without a model (-inf) gets the row's lowest likelihood: no evidence for or against it
        part = np.where(finite, part, np.where(finite, part, np.inf).min(1, keepdims=True))
        rel[ok] = part - part.max(1, keepdims=True)
    return softmax(np.log(np.clip(ev.probs, EPS, None)) + weight * rel, axis=1)


def weight_grid(search: dict) -> np.ndarray:
    lo, hi = search["soft_weight"]
    return np.concatenate([[0.0], np.geomspace(lo, hi, int(search.get("soft_grid", 41)))])


def fit_soft(ev: Evidence, y: np.ndarray, decide: Decide, search: dict, n_classes: int) -> tuple[float, float]:
    """The grid weight with the best macro-F1 (ties: the smallest, so 0 wins when nothing helps)."""
    best_w, best = 0.0, -1.0
    for w in weight_grid(search):
        f1 = macro_f1(y, decide(soft_probs(ev, w)), n_classes)
        if f1 > best + 1e-12:
            best_w, best = float(w), f1
    return best_w, best


# ---------------------------------------------------------------- nested estimate

@dataclass
class Settings:
    classes: list[str]
    rare: list[str]
    search: dict
    n_trials: int = 200
    seed: int = 0
    shape_top: int = 2
    min_samples: int = 10
    fallback: str = "pooled"


def oof_evidence(x, y, folds, probs, base, shape, shape_names, s: Settings) -> Evidence:
    """Evidence for fitting rows: each row's distances from Gaussians fitted without its fold."""
    dist, ll = crossfit(x, y, folds, len(s.classes), s.min_samples, s.fallback)
    return Evidence(probs, base, dist, ll, shape, shape_names)


def new_evidence(g: ClassGaussians, x, probs, base, shape, shape_names) -> Evidence:
    """Evidence for rows the Gaussians `g` never saw (held-out fold, eval, test)."""
    return Evidence(probs, base, g.mahalanobis(x), g.loglik(x), shape, shape_names)


def fit_gaussians(x, y, s: Settings) -> ClassGaussians:
    return ClassGaussians(s.min_samples, s.fallback).fit(x, y, len(s.classes))


def nested(x, y, folds, probs, base, shape, shape_names, decide: Decide, s: Settings) -> dict:
    """Tune on K-1 folds (distances cross-fitted inside them), predict the held-out fold; returns the
    held-out predictions of both rules and the per-fold parameters."""
    if len(np.unique(folds)) < 3:  # the distances are cross-fitted inside the K-1 tuning folds: two at least
        raise WBCError(f"refine.nested needs predictions over at least 3 folds, these cover {len(np.unique(folds))}: "
                       "set refine.nested=false (or predict more folds)")
    hard = base.copy()
    soft_p = probs.copy()
    per_fold = []
    for k in np.unique(folds):
        out, inn = folds == k, folds != k
        ev_in = oof_evidence(x[inn], y[inn], folds[inn], probs[inn], base[inn], shape[inn], shape_names, s)
        ev_out = new_evidence(fit_gaussians(x[inn], y[inn], s), x[out], probs[out], base[out], shape[out],
                              shape_names)
        params, _ = fit_hard(ev_in, y[inn], s.classes, s.rare, s.search, s.n_trials, s.seed + int(k), s.shape_top)
        w, _ = fit_soft(ev_in, y[inn], decide, s.search, len(s.classes))
        hard[out] = apply_hard(ev_out, params, s.classes)
        soft_p[out] = soft_probs(ev_out, w)
        per_fold.append({"fold": int(k), "gates": sorted(params["gates"]), "soft_weight": w})
    return {"hard": hard, "soft": decide(soft_p), "per_fold": per_fold}
