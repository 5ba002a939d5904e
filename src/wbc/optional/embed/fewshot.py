"""Few-shot evaluation on embeddings: N-way K-shot episodes and the "L labels per class" protocol.

Episodes are balanced: every class in an episode has exactly K support and Q query images; a query is never
a support image, and with groups (e.g. damaged copies of one original, or a patient) never shares a group
with any support image. Queries are classified by the nearest class mean (cosine), the standard prototype
readout. Results are the mean over episodes with a 95% interval (1.96 standard errors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.metrics import macro_f1
from .classifiers import PrototypeClassifier


@dataclass
class Episode:
    classes: np.ndarray  # class ids in the episode
    support: np.ndarray  # row indices, K per class
    query: np.ndarray  # row indices, Q per class


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v)))


def eligible_classes(y: np.ndarray, k_shot: int, n_query: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Classes with enough images (and distinct groups) for K support + Q query images."""
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        need = k_shot + n_query
        if len(idx) >= need and (groups is None or len(np.unique(groups[idx])) >= 2):
            out.append(c)
    return np.asarray(out, dtype=int)


def sample_episode(y: np.ndarray, k_shot: int, n_query: int, rng: np.random.Generator, n_way: int | None = None,
                   groups: np.ndarray | None = None) -> Episode | None:
    """One balanced episode, or None when fewer than 2 classes can take part."""
    y = np.asarray(y)
    cand = eligible_classes(y, k_shot, n_query, groups)
    if len(cand) < 2:
        return None
    if n_way and len(cand) > n_way:
        cand = np.sort(rng.choice(cand, n_way, replace=False))
    support = {int(c): rng.choice(np.flatnonzero(y == c), k_shot, replace=False) for c in cand}
    taken = np.zeros(len(y), bool)
    taken[np.concatenate(list(support.values()))] = True
    if groups is not None:  # every image sharing a group with any support image is off limits for queries
        taken |= np.isin(groups, groups[taken])
    keep, sup, qry = [], [], []
    for c in cand:
        pool = np.flatnonzero((y == c) & ~taken)
        if len(pool) < n_query:
            continue
        keep.append(int(c))
        sup.append(support[int(c)])
        qry.append(rng.choice(pool, n_query, replace=False))
    if len(keep) < 2:
        return None
    return Episode(np.asarray(keep), np.concatenate(sup), np.concatenate(qry))


def evaluate_episode(emb: np.ndarray, y: np.ndarray, ep: Episode) -> tuple[float, float]:
    """(accuracy, macro-F1) of nearest-prototype classification of the episode's queries."""
    lut = {c: i for i, c in enumerate(ep.classes)}
    ys, yq = np.array([lut[c] for c in y[ep.support]]), np.array([lut[c] for c in y[ep.query]])
    pred = PrototypeClassifier(len(ep.classes)).fit(emb[ep.support], ys).logits(emb[ep.query]).argmax(1)
    return float((pred == yq).mean()), macro_f1(yq, pred, len(ep.classes))


def run_episodes(spaces: list[dict], k_shots, episodes: int, n_query: int, seed: int = 0,
                 n_way: int | None = None) -> list[dict]:
    """Episodes per K, drawn in turn from each embedding space (dict emb, y[, groups]): support and query
    always come from one space, since two fold encoders embed into different spaces."""
    rows = []
    for k in k_shots:
        rng = np.random.default_rng([seed, int(k)])
        accs, f1s, ways = [], [], []
        for e in range(int(episodes)):
            sp = spaces[e % len(spaces)]
            ep = sample_episode(sp["y"], int(k), n_query, rng, n_way, sp.get("groups"))
            if ep is None:
                continue
            a, f = evaluate_episode(sp["emb"], sp["y"], ep)
            accs.append(a)
            f1s.append(f)
            ways.append(len(ep.classes))
        acc, acc_ci = mean_ci(accs)
        f1, f1_ci = mean_ci(f1s)
        rows.append({"k_shot": int(k), "episodes": len(accs), "n_way": float(np.mean(ways)) if ways else 0.0,
                     "n_query": n_query, "accuracy": acc, "accuracy_ci95": acc_ci, "macro_f1": f1,
                     "macro_f1_ci95": f1_ci})
    return rows


def subsample_per_class(y: np.ndarray, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices with at most `n_per_class` random images of every class."""
    parts = [rng.choice(idx, min(n_per_class, len(idx)), replace=False)
             for idx in (np.flatnonzero(y == c) for c in np.unique(y))]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, int)
