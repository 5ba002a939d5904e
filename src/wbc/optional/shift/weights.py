"""Importance weights for a covariate shift: a domain classifier (pool vs target) on damage features.

With both domains weighted equally in the classifier's loss, p / (1 - p) estimates the density ratio
p_target(x) / p_pool(x). Probabilities are cross-fitted (each pool image scored by a classifier that did not
see it), the weights are scaled to mean 1 and capped, and their effective sample size says how many pool images
the weighted estimate is really worth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.errors import WBCError


@dataclass
class ShiftWeights:
    weights: np.ndarray  # one per pool row, mean 1
    auc: float           # cross-fitted domain AUC: 0.5 = the target looks like the pool
    ess: float           # effective sample size (sum w)^2 / sum w^2
    capped: int          # pool rows held at the cap


def _classifier(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    # Quadratic terms: damage moves features both ways (blur lowers the noise level, noise raises it).
    return make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False), StandardScaler(),
                         LogisticRegression(C=c, class_weight="balanced", max_iter=5000))


def cap_weights(w: np.ndarray, cap: float, rounds: int = 20) -> tuple[np.ndarray, int]:
    """Scale to mean 1 with no weight above `cap` (iterated: re-scaling after capping lifts the rest)."""
    w = np.asarray(w, float) / np.mean(w)
    hit = np.zeros(len(w), bool)
    for _ in range(rounds):
        hit = w >= cap
        if not hit.any() or cap * hit.sum() >= len(w):
            break
        free = ~hit
        w = np.where(hit, cap, w * (len(w) - cap * hit.sum()) / w[free].sum())
        if w[free].max() <= cap:
            break
    return w, int(hit.sum())


def domain_weights(pool: np.ndarray, target: np.ndarray, cap: float = 20.0, n_splits: int = 5, c: float = 1.0,
                   seed: int = 0) -> ShiftWeights:
    """Weights for the rows of `pool` (features, n x d) that make it look like `target` (m x d)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    pool, target = np.asarray(pool, float), np.asarray(target, float)
    if len(pool) < n_splits or len(target) < n_splits:
        raise WBCError(f"shift weights need at least {n_splits} pool and target images, "
                       f"got {len(pool)} and {len(target)}")
    x = np.concatenate([pool, target])
    d = np.r_[np.zeros(len(pool), int), np.ones(len(target), int)]
    p = np.empty(len(x))
    for tr, te in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, d):
        p[te] = _classifier(c).fit(x[tr], d[tr]).predict_proba(x[te])[:, 1]
    p_pool = np.clip(p[: len(pool)], 1e-6, 1 - 1e-6)
    w, capped = cap_weights(p_pool / (1 - p_pool), cap)
    return ShiftWeights(w, float(roc_auc_score(d, p)), float(w.sum() ** 2 / (w ** 2).sum()), capped)
