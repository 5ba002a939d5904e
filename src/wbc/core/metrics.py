"""Macro-F1 (the leaderboard score), per-class F1, balanced accuracy and a confusion-matrix PNG."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_score, recall_score


def macro_f1(y_true, y_pred, n_classes: int, sample_weight=None) -> float:
    """Macro-F1 over the classes that occur in y_true or y_pred (a class in neither is left out, as sklearn's
    `f1_score(labels=<classes seen>, zero_division=0)`; an absent one scores 0 and counts); 0.0 for no images.
    `sample_weight` counts image i as sample_weight[i] images (importance-weighted estimates).
    From bincounts, not sklearn: tuners and bootstraps call it thousands of times, and sklearn's input checks
    cost about 5 ms a call."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"macro_f1: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D shapes")
    if not len(y_true):
        return 0.0
    if y_true.dtype.kind not in "iu" or y_pred.dtype.kind not in "iu" or min(y_true.min(), y_pred.min()) < 0:
        _, idx = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)  # any labels -> 0..k-1
        y_true, y_pred = idx[:len(y_true)], idx[len(y_true):]
    k = max(int(n_classes), int(y_true.max()) + 1, int(y_pred.max()) + 1)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    hit = y_true == y_pred
    tp = np.bincount(y_true[hit], None if w is None else w[hit], minlength=k)
    denom = np.bincount(y_true, w, minlength=k) + np.bincount(y_pred, w, minlength=k)
    seen = (np.bincount(y_true, minlength=k) + np.bincount(y_pred, minlength=k)) > 0
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1[seen].mean())


def per_class_f1(y_true, y_pred, n_classes: int) -> np.ndarray:
    return f1_score(y_true, y_pred, labels=np.arange(n_classes), average=None, zero_division=0)


def _prf(fn, y_true, y_pred, n: int) -> np.ndarray:
    return fn(y_true, y_pred, labels=np.arange(n), average=None, zero_division=0) if len(y_true) else np.zeros(n)


def summary(y_true, y_pred, classes: list[str]) -> dict:
    n = len(classes)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if not len(y_true):  # sklearn refuses empty input; no images: zeros
        y_true = y_pred = np.zeros(0, int)
    return {
        "macro_f1": macro_f1(y_true, y_pred, n),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "per_class_f1": dict(zip(classes, map(float, per_class_f1(y_true, y_pred, n) if len(y_true) else np.zeros(n)))),
        "per_class_precision": dict(zip(classes, map(float, _prf(precision_score, y_true, y_pred, n)))),
        "per_class_recall": dict(zip(classes, map(float, _prf(recall_score, y_true, y_pred, n)))),
        "support": dict(zip(classes, map(int, np.bincount(y_true, minlength=n)))),
        # Predicted next to true counts: a class predicted far more often than it occurs is over-corrected.
        "predicted": dict(zip(classes, map(int, np.bincount(y_pred, minlength=n)))),
        "n": int(len(y_true)),
    }


def save_confusion_png(path, y_true, y_pred, classes: list[str], title: str = "") -> None:
    """Row-normalised confusion matrix with counts, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    n = len(classes)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(n))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.55 * n), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"macro-F1 {macro_f1(y_true, y_pred, n):.4f}")
    try:
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive
