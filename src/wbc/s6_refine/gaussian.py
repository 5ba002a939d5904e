"""Per-class Gaussian models of morphology features: Ledoit-Wolf shrinkage covariances, with a pooled or
diagonal fallback for classes too small for their own; Mahalanobis distances and log-likelihoods.

Features are put on a common scale first (`FeatureScaler`: log of heavy-tailed features, then robust
centring by the median and scaling by the MAD, clipped), so the shrinkage target (a scaled identity)
and the diagonal fallback treat every feature alike. A row with a missing feature (failed segmentation)
gets NaN distances: callers treat it as "no morphology evidence".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.covariance import LedoitWolf

from ..core.errors import WBCError
from .morphology import LOG_FEATURES

CLIP = 8.0  # robust z-scores beyond this are segmentation outliers, not biology


@dataclass
class FeatureScaler:
    columns: list[str]
    center: np.ndarray | None = None
    scale: np.ndarray | None = None

    def _raw(self, df: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise WBCError(f"feature table lacks column(s) {', '.join(missing)}")
        x = np.array(df[self.columns].apply(pd.to_numeric, errors="coerce"), dtype=float)  # a writable copy
        for j, c in enumerate(self.columns):
            if c in LOG_FEATURES:
                x[:, j] = np.log(np.maximum(x[:, j], 1e-6))
        x[~np.isfinite(x)] = np.nan
        return x

    def fit(self, df: pd.DataFrame) -> "FeatureScaler":
        x = self._raw(df)
        self.center = np.nanmedian(x, 0)
        mad = 1.4826 * np.nanmedian(np.abs(x - self.center), 0)
        std = np.nanstd(x, 0)
        self.scale = np.where(mad > 1e-9, mad, np.where(std > 1e-9, std, 1.0))  # integer features: MAD 0
        self.center = np.nan_to_num(self.center)
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """(n, d) z-scores; a row with any missing feature is all NaN."""
        z = np.clip((self._raw(df) - self.center) / self.scale, -CLIP, CLIP)
        z[np.isnan(z).any(1)] = np.nan
        return z


class ClassGaussians:
    """One Gaussian per class. `kinds[c]`: 'full' (own Ledoit-Wolf covariance, at least `min_samples`
    rows), 'pooled' (the within-class Ledoit-Wolf covariance of all classes) or 'diagonal' (own variances)
    below that, 'none' for a class without rows (distance +inf)."""

    def __init__(self, min_samples: int = 10, fallback: str = "pooled"):
        if fallback not in ("pooled", "diagonal"):
            raise WBCError(f"covariance fallback must be pooled or diagonal, not {fallback!r}")
        self.min_samples, self.fallback = int(min_samples), fallback

    def fit(self, x: np.ndarray, y: np.ndarray, n_classes: int) -> "ClassGaussians":
        x, y = np.asarray(x, float), np.asarray(y)
        keep = np.isfinite(x).all(1) & (y >= 0)
        x, y = x[keep], y[keep]
        d = x.shape[1]
        if len(x) < 2:
            raise WBCError("fewer than 2 labelled rows with morphology features: nothing to fit")
        means = np.full((n_classes, d), np.nan)
        counts = np.bincount(y, minlength=n_classes)
        for c in range(n_classes):
            if counts[c]:
                means[c] = x[y == c].mean(0)
        resid = x - means[y]
        pooled = LedoitWolf(assume_centered=True).fit(resid).covariance_
        covs, kinds = np.zeros((n_classes, d, d)), []
        for c in range(n_classes):
            if counts[c] == 0:
                covs[c], kind = pooled, "none"
            elif counts[c] >= self.min_samples:
                covs[c], kind = LedoitWolf().fit(x[y == c]).covariance_, "full"
            elif self.fallback == "diagonal" and counts[c] >= 2:
                var = x[y == c].var(0, ddof=1)
                covs[c], kind = np.diag(np.maximum(var, 1e-3 * np.diag(pooled))), "diagonal"
            else:
                covs[c], kind = pooled, "pooled"
            kinds.append(kind)
        return self._set(means, covs, kinds, counts)

    def _set(self, means, covs, kinds, counts):
        self.means, self.covs, self.kinds, self.counts = means, covs, kinds, counts
        self.precisions = np.linalg.inv(covs)
        self.logdets = np.linalg.slogdet(covs)[1]
        return self

    def mahalanobis(self, x: np.ndarray) -> np.ndarray:
        """(n, C) distances sqrt((x - mu_c)' S_c^-1 (x - mu_c)); NaN rows stay NaN, 'none' classes +inf."""
        x = np.asarray(x, float)
        diff = x[:, None, :] - self.means[None]  # (n, C, d)
        dist = np.sqrt(np.maximum(np.einsum("ncd,cde,nce->nc", diff, self.precisions, diff), 0.0))
        dist[:, np.array([k == "none" for k in self.kinds], bool)] = np.inf
        dist[~np.isfinite(x).all(1)] = np.nan
        return dist

    def loglik(self, x: np.ndarray) -> np.ndarray:
        """(n, C) Gaussian log-densities; NaN rows stay NaN, 'none' classes -inf."""
        dist = self.mahalanobis(x)
        d = self.means.shape[1]
        return -0.5 * (dist ** 2 + self.logdets[None] + d * np.log(2 * np.pi))


def crossfit(x: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int, min_samples: int = 10,
             fallback: str = "pooled", fit_rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Mahalanobis distances and log-likelihoods of each row under Gaussians fitted without its fold.
    `fit_rows` (bool mask) limits which rows may be used for fitting (default: all labelled)."""
    folds = np.asarray(folds)
    fit_rows = np.ones(len(y), bool) if fit_rows is None else np.asarray(fit_rows, bool)
    dist = np.full((len(y), n_classes), np.nan)
    ll = np.full((len(y), n_classes), np.nan)
    for k in np.unique(folds):
        out = folds == k
        g = ClassGaussians(min_samples, fallback).fit(x[fit_rows & ~out], y[fit_rows & ~out], n_classes)
        dist[out], ll[out] = g.mahalanobis(x[out]), g.loglik(x[out])
    return dist, ll
