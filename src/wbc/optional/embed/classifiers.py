"""Classifiers on embeddings, all `fit(emb, y)` / `predict_proba(emb) -> (n, n_classes)`.

Columns always cover every class 0..n_classes-1, so a fold whose training part lacks a class still writes
a full probability file (that class gets probability 0). Embeddings are L2-normalised on the way in.
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.errors import WBCError


def l2norm(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights giving every present class the same total weight (macro-F1 is class-balanced)."""
    counts = np.bincount(y)
    w = 1.0 / counts[y]
    return w * len(y) / w.sum()


class PrototypeClassifier:
    """Softmax over T_c * cos(z, mean of class c). T_c = `temperature`, or fitted per class (per_class=True)
    by class-balanced cross-entropy on leave-one-out similarities (an image never votes for its own prototype),
    pulled towards `temperature` in log space."""

    def __init__(self, n_classes: int, temperature: float = 10.0, per_class: bool = False, reg: float = 0.1):
        self.n_classes, self.temperature, self.per_class, self.reg = n_classes, float(temperature), per_class, reg

    def fit(self, emb, y):
        z, y = l2norm(emb), np.asarray(y, dtype=int)
        sums = np.zeros((self.n_classes, z.shape[1]), np.float32)
        np.add.at(sums, y, z)
        self.counts = np.bincount(y, minlength=self.n_classes)
        self.prototypes = l2norm(sums) * (self.counts > 0)[:, None]
        self.temperatures = np.full(self.n_classes, self.temperature, np.float32)
        if self.per_class:
            self.temperatures = self._fit_temperatures(z, y, sums)
        return self

    def _fit_temperatures(self, z, y, sums) -> np.ndarray:
        from scipy.optimize import minimize

        sim = z @ self.prototypes.T
        ok = self.counts[y] > 1  # a singleton class has no leave-one-out prototype
        if ok.sum() < 2:
            return self.temperatures
        sim[np.flatnonzero(ok), y[ok]] = (l2norm(sums[y[ok]] - z[ok]) * z[ok]).sum(1)
        s, t = sim[ok].astype(np.float64), y[ok]
        w = balanced_weights(t) / ok.sum()
        onehot = np.eye(self.n_classes)[t]
        present = self.counts > 0
        log_t0 = float(np.log(self.temperature))

        def loss_grad(log_t):
            logits = s * np.exp(log_t)
            logits[:, ~present] = -np.inf
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            logp = np.log(np.clip(p[np.arange(len(t)), t], 1e-300, None))
            d = log_t - log_t0
            loss = -(w * logp).sum() + self.reg * (d ** 2).mean()
            grad = ((w[:, None] * (p - onehot)) * s).sum(0) * np.exp(log_t) + 2 * self.reg * d / len(d)
            return loss, grad

        res = minimize(loss_grad, np.full(self.n_classes, log_t0), jac=True, method="L-BFGS-B")
        return np.exp(res.x).astype(np.float32)

    def logits(self, emb) -> np.ndarray:
        out = (l2norm(emb) @ self.prototypes.T) * self.temperatures
        out[:, self.counts == 0] = -np.inf
        return out

    def predict_proba(self, emb) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits(emb)).double(), dim=1).numpy()


class KNNClassifier:
    """Cosine k-NN with exp(sim / temperature) vote weights (the DINO / InstDisc k-NN readout)."""

    def __init__(self, n_classes: int, k: int = 10, temperature: float = 0.07, chunk: int = 1024):
        self.n_classes, self.k, self.temperature, self.chunk = n_classes, int(k), float(temperature), chunk

    def fit(self, emb, y):
        self.bank = torch.from_numpy(l2norm(emb))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        return self

    def predict_proba(self, emb) -> np.ndarray:
        q = torch.from_numpy(l2norm(emb))
        k = min(self.k, len(self.y))
        out = []
        for s in range(0, len(q), self.chunk):
            sim, idx = (q[s:s + self.chunk] @ self.bank.T).topk(k, dim=1)
            w = ((sim - sim[:, :1]) / self.temperature).exp().double()  # shifted: exp never overflows
            votes = torch.zeros(len(sim), self.n_classes, dtype=torch.float64)
            votes.scatter_add_(1, self.y[idx], w)
            out.append(votes / votes.sum(1, keepdim=True))
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_classes))


class SklearnClassifier:
    """Standardised embeddings -> logistic regression or a one-hidden-layer MLP, class-balanced."""

    def __init__(self, n_classes: int, kind: str = "logreg", C: float = 1.0, hidden: int = 256,
                 max_iter: int = 1000, seed: int = 0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.n_classes, self.kind = n_classes, kind
        if kind == "logreg":
            est = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        elif kind == "mlp":
            est = MLPClassifier(hidden_layer_sizes=(int(hidden),), max_iter=max_iter, random_state=seed)
        else:
            raise WBCError(f"unknown sklearn classifier '{kind}' (logreg | mlp)")
        self.model = make_pipeline(StandardScaler(), est)

    def fit(self, emb, y, sample_weight=None):
        """Class-balanced unless `sample_weight` says otherwise."""
        y = np.asarray(y, dtype=int)
        step = self.model.steps[-1][0]
        w = balanced_weights(y) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.model.fit(l2norm(emb), y, **{f"{step}__sample_weight": w})
        return self

    def predict_proba(self, emb) -> np.ndarray:
        out = np.zeros((len(emb), self.n_classes))
        out[:, self.model.classes_] = self.model.predict_proba(l2norm(emb))
        return out


class HierarchicalClassifier:
    """Lineage, then stage: p(c) = p(lineage) p(c | lineage) for the classes of `group` (e.g. PMY MY MMY BNE SNE),
    p(c) itself for the others. The coarse level sees the group merged into one label, weighted so that every fine
    class keeps the same total weight (macro-F1 counts the group's stages, not the group); the fine level is fitted
    on the group's images alone, class-balanced. Both levels are `make_base()` classifiers."""

    def __init__(self, n_classes: int, group: list[int], make_base):
        if len(set(group)) < 2:
            raise WBCError(f"a hierarchy needs at least two classes in its group, got {len(set(group))}")
        self.n_classes, self.group, self.make_base = n_classes, sorted(set(group)), make_base

    def fit(self, emb, y):
        y = np.asarray(y, dtype=int)
        inside = np.isin(y, self.group)
        self.coarse_label = self.group[0]
        merged = np.where(inside, self.coarse_label, y)
        self.coarse = self.make_base().fit(emb, merged, sample_weight=balanced_weights(y))
        self.fine = self.make_base().fit(emb[inside], y[inside]) if len(set(y[inside])) > 1 else None
        self.only = y[inside][0] if self.fine is None and inside.any() else None
        return self

    def predict_proba(self, emb) -> np.ndarray:
        p = self.coarse.predict_proba(emb)
        p_group = p[:, self.coarse_label].copy()
        p[:, self.group] = 0.0
        if self.fine is not None:
            p[:, self.group] = p_group[:, None] * self.fine.predict_proba(emb)[:, self.group]
        elif self.only is not None:  # the training part held one stage of the group: it takes the group's mass
            p[:, self.only] = p_group
        return p


CLASSIFIERS = ("proto", "knn", "logreg", "mlp", "hier")


def hierarchy_group(ecfg: dict, classes) -> list[int]:
    """Indices of `embed.hierarchy`'s classes that the dataset has (another dataset may lack some)."""
    if classes is None:
        raise WBCError("embed.classifiers: hier needs the dataset's class names")
    codes = ecfg["hierarchy"] or []
    group = [list(classes).index(c) for c in codes if c in classes]
    if len(group) < 2:
        raise WBCError(f"embed.hierarchy {codes}: fewer than two of these classes are in the data "
                       f"({', '.join(classes)})")
    return group


def build_classifier(name: str, n_classes: int, ecfg: dict, seed: int = 0, classes=None):
    if name == "proto":
        return PrototypeClassifier(n_classes, ecfg["proto_temperature"], bool(ecfg["proto_per_class_temperature"]))
    if name == "knn":
        return KNNClassifier(n_classes, ecfg["knn_k"], ecfg["knn_temperature"])
    if name in ("logreg", "mlp"):
        return SklearnClassifier(n_classes, name, C=float(ecfg["linear_C"]), hidden=int(ecfg["mlp_hidden"]),
                                 seed=seed)
    if name == "hier":
        return HierarchicalClassifier(n_classes, hierarchy_group(ecfg, classes),
                                      lambda: SklearnClassifier(n_classes, "logreg", C=float(ecfg["linear_C"]),
                                                                seed=seed))
    raise WBCError(f"embed.classifiers: unknown classifier '{name}' ({' | '.join(CLASSIFIERS)})")
