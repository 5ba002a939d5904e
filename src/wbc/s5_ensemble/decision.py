"""The macro-F1 decision rule applied to (blended) class probabilities.

Three steps, each optional, in this order:
1. biased argmax: `argmax_c log p_c + bias_c` (logit adjustment `-tau * log prior_c` is the special case
   the tuner starts from);
2. thresholds: a listed (rare) class wins whenever its raw probability reaches its threshold (several
   passing: the largest `p_c / threshold_c`);
3. confusion pairs: for each listed pair (a, b) in turn, a row the steps above gave a or b (not by a threshold) is
   decided again between the two alone, with a margin m_ab added to a's biased score: `a` when
   `log p_a + bias_a + m_ab >= log p_b + bias_b`. Margin 0 changes nothing; unlike a class bias, it moves rows
   only between neighbouring maturation stages (BNE / SNE, MY / MMY, PMY / MY), never from another class;
4. quota: a class predicted fewer than `floor(quota * prior_c * n)` times takes its most probable
   candidates up to that count, rarest class first; each class then keeps its `target` most probable rows,
   so a later class only takes another's surplus and every class ends with at least its target.

Rule parameters are a JSON-able dict (the `rule` entry of `decision.json`):
`{"classes": [...], "bias": {c: b}, "thresholds": {c: t}, "quota": q, "prior": {c: p}, "pairs": {"a|b": m}}`
(`pairs` optional).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.errors import WBCError

EPS = 1e-12


def make_rule(classes: list[str], bias, thresholds: dict, quota: float, prior, pairs: dict | None = None) -> dict:
    rule = {"classes": list(classes),
            "bias": {c: float(b) for c, b in zip(classes, bias)},
            "thresholds": {c: float(t) for c, t in thresholds.items()},
            "quota": float(quota),
            "prior": {c: float(p) for c, p in zip(classes, prior)}}
    if pairs:
        rule["pairs"] = {k: float(m) for k, m in pairs.items()}
    return rule


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def class_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Label frequencies with add-one smoothing, so `log prior` is finite for an unseen class."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    return (counts + 1.0) / (counts.sum() + n_classes)


def _check(probs: np.ndarray, params: dict) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    classes = params["classes"]
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise WBCError(f"decision rule is for {len(classes)} classes, probabilities have shape {probs.shape}")
    in_pairs = {c for k in params.get("pairs") or {} for c in k.split("|")}
    unknown = (set(params["bias"]) | set(params["thresholds"]) | set(params["prior"]) | in_pairs) - set(classes)
    if unknown:
        raise WBCError(f"decision rule names unknown class(es) {', '.join(sorted(unknown))}")
    return probs


def apply_rule(probs: np.ndarray, params: dict) -> np.ndarray:
    """Class indices (into `params['classes']`) for each row of `probs` (n, n_classes). The quota counts
    over the rows passed in: apply the rule to a whole split at once, not in batches."""
    probs = _check(probs, params)
    classes = params["classes"]
    n, n_cls = probs.shape
    bias = np.array([params["bias"].get(c, 0.0) for c in classes])
    score = np.log(np.clip(probs, EPS, None)) + bias
    pred = np.argmax(score, axis=1)
    if n == 0:
        return pred

    thr = params["thresholds"]
    hit = np.zeros(n, dtype=bool)
    if thr:
        idx = np.array([classes.index(c) for c in thr])
        t = np.array([thr[c] for c in thr])
        ratio = probs[:, idx] / t
        passing = ratio >= 1.0
        hit = passing.any(axis=1)
        best = np.argmax(np.where(passing, ratio, -np.inf), axis=1)
        pred = np.where(hit, idx[best], pred)

    for key, margin in (params.get("pairs") or {}).items():
        a, b = (classes.index(c) for c in key.split("|"))
        rows = ((pred == a) | (pred == b)) & ~hit
        pred[rows] = np.where(score[rows, a] + margin >= score[rows, b], a, b)

    q = params["quota"]
    if q > 0:
        prior = np.array([params["prior"][c] for c in classes])
        locked = np.zeros(n, dtype=bool)  # rows a class needs for its own quota
        for c in np.argsort(prior, kind="stable"):
            target = int(np.floor(q * prior[c] * n))
            if target == 0:
                continue
            deficit = target - int((pred == c).sum())
            if deficit > 0:
                free = np.flatnonzero((pred != c) & ~locked)
                pred[free[np.argsort(-probs[free, c], kind="stable")[:deficit]]] = c
            rows = np.flatnonzero(pred == c)
            locked[rows[np.argsort(-probs[rows, c], kind="stable")[:target]]] = True
    return pred


def load_rule(path) -> dict:
    """The rule from a `decision.json` written by `make ensemble` (or a bare rule JSON)."""
    path = Path(path)
    if not path.exists():
        raise WBCError(f"{path}: decision file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WBCError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    rule = data.get("rule", data) if isinstance(data, dict) else None
    need = {"classes", "bias", "thresholds", "quota", "prior"}
    if not isinstance(rule, dict) or not need <= set(rule):
        raise WBCError(f"{path}: no decision rule (needs {', '.join(sorted(need))})")
    return rule
