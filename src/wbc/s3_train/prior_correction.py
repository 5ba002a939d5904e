"""How far a training recipe moves the model's decisions from the natural class prior towards the balanced one.

Each long-tail device multiplies the class odds the model learns by n_c^-a for some exponent a:
- a sampler giving class c the mass m_c: a = -slope of log(m_c / n_c) against log n_c (`sqrt` 0.5, `balanced` 1);
- loss class weights w_c: the same slope of log w_c (`inverse` with power p: p);
- a loss logit offset tau * log prior (`logit_adjusted` tau, `balanced_softmax` 1): the raw logits then
  lack that much of the prior.
The exponents add up. 0 keeps the natural prior (best accuracy), 1 targets the balanced prior (best mean
recall); above 1 decisions favour rare classes beyond balance. Where macro-F1 peaks depends on the model (a weak,
uncertain one turns the same exponent into more rare-class errors: docs/RESULTS.md), which is why the ensemble
tunes a post-hoc prior shift on OOF. Focal loss and label smoothing reshape the loss, not the prior,
and are left out. For `effective` samplers / weights the law is not a power, so the slope is a fit.
"""
from __future__ import annotations

import numpy as np

from ..core.config import section
from ..core.console import console
from .losses import class_weights
from .sampling import class_sampling_weights

OVER = 1.05  # above this the recipe corrects more than fully (tolerates rounding of hand-set exponents)


def _exponent(per_class: np.ndarray, n: np.ndarray) -> float:
    """-slope of log(per_class) on log n over the classes present (0 when all counts are equal)."""
    keep = n > 0
    x, y = np.log(n[keep]), np.log(per_class[keep])
    if np.ptp(x) == 0:
        return 0.0
    return float(-np.polyfit(x, y, 1)[0])


def prior_correction(train_cfg: dict, class_counts, stage: int = 1) -> dict:
    """The exponents of `train.sampler`, `train.loss` class weights and loss offset, and their sum, for a stage."""
    n = np.asarray(class_counts, dtype=np.float64)
    labels = np.repeat(np.arange(len(n)), n.astype(int))
    t = section("train", train_cfg)
    if stage == 2:  # decoupled re-training: its own sampler, plain CE without weights
        sampler = section("train.sampler", {"type": t["stage2"]["sampler"]})
        loss = section("train.loss", {"type": "ce", "class_weight": "none"})
    else:
        sampler, loss = t["sampler"], t["loss"]
    per_sample = class_sampling_weights(labels, len(n), sampler["type"] or "none", power=sampler["power"],
                                        beta=sampler["beta"])
    per_class = np.zeros(len(n))
    per_class[labels] = per_sample  # every image of a class carries the same weight
    weights = class_weights(n, loss["class_weight"] or "none", power=loss["class_weight_power"], beta=loss["beta"])
    kind = loss["type"]
    offset = 1.0 if kind == "balanced_softmax" else float(loss["tau"]) if kind == "logit_adjusted" else 0.0
    parts = {"sampler": _exponent(np.where(n > 0, per_class, 1.0), n), "class_weights": _exponent(weights, n),
             "loss_offset": offset}
    return {**parts, "total": sum(parts.values())}


def report_prior_correction(train_cfg: dict, class_counts) -> dict:
    """Print the stage-1 (and stage-2) exponents, warning when a stage over-corrects; returns them."""
    stages = {"stage1": prior_correction(train_cfg, class_counts)}
    if int(section("train", train_cfg)["stage2"]["epochs"] or 0) > 0:
        stages["stage2"] = prior_correction(train_cfg, class_counts, stage=2)
    for name, p in stages.items():
        over = p["total"] > OVER
        console.print(f"{'[yellow]' if over else ''}{name} class-prior correction {p['total']:.2f} "
                      f"(sampler {p['sampler']:.2f} + class weights {p['class_weights']:.2f} + loss offset "
                      f"{p['loss_offset']:.2f}; 0 = natural prior, 1 = balanced)"
                      + (": more than balanced, rare classes will be over-predicted[/]" if over else ""))
    return stages
