"""Long-tail classification losses on logits (B, C) with integer (B,) or soft (B, C) targets.

Every loss here is one formula: a weighted, optionally label-smoothed cross-entropy on shifted logits,

    loss_i = -sum_c w_c * q_ic * (1 - p_ic)^gamma * log p_ic,   p_i = softmax(z_i + offset)
    loss   = sum_i loss_i / sum_i sum_c w_c * t_ic

with t the target distribution (one-hot or soft), q = (1 - eps) t + eps / C its smoothed version, w the
class weights and gamma the focal exponent. The denominator is PyTorch's weighted-mean convention, so
`ce` equals `F.cross_entropy(weight=..., label_smoothing=...)` on hard targets.

- `ce`: offset 0, gamma 0.
- `focal` (Lin et al. 2017): gamma > 0; the class weights play the role of alpha.
- `balanced_softmax` (Ren et al. 2020): offset = log prior.
- `logit_adjusted` (Menon et al. 2021): offset = tau * log prior. The shift lives only in the loss; the
  model's raw logits are then prior-free scores, so inference uses them unchanged.

Class weights (`class_weight`): `none`; `inverse` w ~ n^-power; `effective` w ~ (1 - beta) / (1 - beta^n)
(Cui et al. 2019). Both are normalised to mean 1 over classes. Combining a weight with a prior offset
corrects for the imbalance twice; the config allows it but it is rarely what you want.

Lineage-aware smoothing (`lineage`, a list of classes in maturation order, e.g. PMY MY MMY BNE SNE): a class of the
lineage gives `lineage_share` of its smoothing mass eps to its neighbours in that order and the rest uniformly, so
the target says a band neutrophil is more like a segmented one or a metamyelocyte than like a lymphocyte; adjacent
stages are where experts disagree too (Matek et al. 2021). q = t M, M = (1 - eps) I + eps S, S's rows the
smoothing distributions (uniform outside the lineage). Off (null), q is computed as above.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import section
from ..core.errors import WBCError

LOSS_TYPES = ("ce", "focal", "balanced_softmax", "logit_adjusted")
WEIGHT_KINDS = ("none", "inverse", "effective")


def _counts(class_counts) -> np.ndarray:
    n = np.asarray(class_counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 0).any() or n.sum() <= 0:
        raise WBCError(f"class counts must be a non-empty, non-negative 1-D array with a positive total, got {n}")
    # A class absent from the training pool is treated as a singleton: no infinite weight or -inf prior.
    return np.maximum(n, 1.0)


def effective_number(class_counts, beta: float) -> np.ndarray:
    """Cui et al. 2019: E_n = (1 - beta^n) / (1 - beta); ~n for small n, saturating at 1 / (1 - beta)."""
    n = _counts(class_counts)
    if not 0.0 <= beta < 1.0:
        raise WBCError(f"effective-number beta must be in [0, 1), got {beta}")
    return -np.expm1(n * np.log(beta)) / (1.0 - beta) if beta > 0 else np.ones_like(n)


def class_weights(class_counts, kind: str = "none", power: float = 0.5, beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights, mean 1 over classes: `none`, `inverse` (n^-power) or `effective` (1 / E_n)."""
    n = _counts(class_counts)
    if kind == "none":
        w = np.ones_like(n)
    elif kind == "inverse":
        w = n ** -float(power)
    elif kind == "effective":
        w = 1.0 / effective_number(n, beta)
    else:
        raise WBCError(f"unknown class_weight '{kind}' (choose from {', '.join(WEIGHT_KINDS)})")
    return w / w.mean()


def log_prior(class_counts) -> np.ndarray:
    """log(n_c / N), the training label prior."""
    n = _counts(class_counts)
    return np.log(n / n.sum())


class LongTailLoss(nn.Module):
    """The weighted, smoothed, focal, logit-shifted cross-entropy of the module docstring."""

    def __init__(self, n_classes: int, weight=None, logit_offset=None, gamma: float = 0.0,
                 label_smoothing: float = 0.0, smoothing_rows=None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise WBCError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if gamma < 0:
            raise WBCError(f"focal gamma must be >= 0, got {gamma}")
        self.n_classes = int(n_classes)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", self._vector(weight, 1.0))
        self.register_buffer("logit_offset", self._vector(logit_offset, 0.0))
        # (C, C) target map q = t M for non-uniform smoothing; None keeps the uniform formula (and its rounding)
        m = None if smoothing_rows is None else (
            (1.0 - self.label_smoothing) * np.eye(self.n_classes) + self.label_smoothing * np.asarray(smoothing_rows))
        self.register_buffer("smoothing", None if m is None else torch.as_tensor(m, dtype=torch.float32))

    def _vector(self, v, fill: float) -> torch.Tensor:
        t = torch.full((self.n_classes,), fill) if v is None else torch.as_tensor(np.asarray(v), dtype=torch.float32)
        if t.shape != (self.n_classes,):
            raise WBCError(f"expected {self.n_classes} per-class values, got shape {tuple(t.shape)}")
        return t

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.n_classes:
            raise ValueError(f"logits must be (B, {self.n_classes}), got {tuple(logits.shape)}")
        # float32 whatever the autocast dtype: log-probabilities of rare classes underflow in bf16.
        logp = F.log_softmax(logits.float() + self.logit_offset, dim=1)
        if target.ndim == 1:
            t = F.one_hot(target.long(), self.n_classes).to(logp.dtype)
        elif target.shape == logits.shape:
            t = target.to(logp.dtype)
        else:
            raise ValueError(f"targets must be (B,) class indices or (B, C) distributions, got {tuple(target.shape)}")
        if self.smoothing is None:
            q = t * (1.0 - self.label_smoothing) + self.label_smoothing / self.n_classes
        else:
            q = t @ self.smoothing
        nll = -logp
        if self.gamma > 0:
            # The floor keeps pow's gradient finite (gamma < 1) where p rounds to 1.
            nll = nll * (1.0 - logp.exp()).clamp_min(1e-12).pow(self.gamma)
        per_sample = (nll * q * self.weight).sum(1)
        return per_sample.sum() / (t * self.weight).sum()

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, gamma={self.gamma}, label_smoothing={self.label_smoothing}"


def lineage_rows(classes: list[str], lineage, share: float) -> np.ndarray | None:
    """(C, C) smoothing distributions: uniform, except that a lineage class puts `share` on its neighbours in the
    lineage's order (half each, all on the one neighbour at an end). None without a lineage."""
    if not lineage:
        return None
    if classes is None:
        raise WBCError("train.loss.lineage needs the model's class names")
    if not 0.0 <= share <= 1.0:
        raise WBCError(f"train.loss.lineage_share must be in [0, 1], got {share}")
    if not all(isinstance(c, str) for c in lineage) or len(set(lineage)) != len(lineage):
        raise WBCError(f"train.loss.lineage: a list of distinct class codes in maturation order, got {lineage}")
    steps = [c for c in lineage if c in classes]  # a specialist holds part of it; another dataset may lack some
    n = len(classes)
    rows = np.full((n, n), 1.0 / n)
    for k, c in enumerate(steps):
        near = [steps[j] for j in (k - 1, k + 1) if 0 <= j < len(steps)]
        if not near:
            continue
        i = classes.index(c)
        rows[i] *= 1.0 - share
        for d in near:
            rows[i, classes.index(d)] += share / len(near)
    return rows


def build_loss(cfg_loss: dict, class_counts, classes: list[str] | None = None) -> LongTailLoss:
    """The `train.loss` config section (all or part of it) as a module taking (logits, targets); `classes` name the
    outputs (needed by lineage-aware smoothing)."""
    c = section("train.loss", cfg_loss)
    kind = c["type"]
    if kind not in LOSS_TYPES:
        raise WBCError(f"unknown train.loss.type '{kind}' (choose from {', '.join(LOSS_TYPES)})")
    counts = _counts(class_counts)
    weight = class_weights(counts, c["class_weight"] or "none", power=c["class_weight_power"], beta=c["beta"])
    offset = None
    if kind == "balanced_softmax":
        offset = log_prior(counts)
    elif kind == "logit_adjusted":
        offset = float(c["tau"]) * log_prior(counts)
    return LongTailLoss(len(counts), weight=weight, logit_offset=offset,
                        gamma=float(c["focal_gamma"]) if kind == "focal" else 0.0,
                        label_smoothing=float(c["label_smoothing"] or 0.0),
                        smoothing_rows=lineage_rows(classes, c["lineage"], float(c["lineage_share"])))
