"""Load ensemble members (run folders with oof/eval/test probability files), check that they describe the
same images, folds and classes, and blend them. A member may be a seed group: several runs of one recipe on the
same folds, averaged with equal weights before the blend, so that seeds add no weights to fit.

Blend weights live on the simplex (softmax-parametrised, so they are positive and sum to one) and are
fitted on OOF by minimising the class-balanced log-loss (each class's mean negative log-likelihood,
averaged over classes) with L-BFGS. Why not macro-F1 directly: it is piecewise constant in the weights
and the decision rule is tuned on the same OOF afterwards; a proper, smooth score gives a stable,
calibrated blend and leaves the F1 trade-offs to the rule. Class balancing keeps the head classes from
deciding the weights alone. The loss is convex in the weights for both blend spaces.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from ..core.config import resolve_path
from ..core.errors import WBCError
from ..core.io import Probs, load_probs
from ..core.run_folder import require_complete
from .decision import EPS

SPACES = ("prob", "logit")


@dataclass
class Member:
    name: str
    path: Path
    oof: Probs
    eval: Probs | None
    test: Probs
    parts: tuple[Path, ...] = ()  # the runs of a seed group; empty for one run

    @property
    def paths(self) -> tuple[Path, ...]:
        return self.parts or (self.path,)


def _check_labels(p: Probs, path: Path, required: bool) -> bool:
    """True when every row is labelled with a known class; False when no row is (and not required)."""
    if p.labels is None or (not required and (p.labels == "").all()):
        if required:
            raise WBCError(f"{path}: no labels column (OOF files need ground truth)")
        return False
    bad = np.flatnonzero(p.label_index() < 0)
    if len(bad):
        i = int(bad[0])
        if p.labels[i] == "":
            raise WBCError(f"{path}:{i + 2}: missing label (ID {p.ids[i]})")
        raise WBCError(f"{path}:{i + 2}: label '{p.labels[i]}' is not one of the classes "
                       f"({', '.join(p.classes)})")
    return True


def _load(path: Path) -> Probs:
    """Probabilities, refusing rows that are not a distribution (e.g. logits written by mistake)."""
    p = load_probs(path)
    bad = np.flatnonzero(~np.isfinite(p.probs).all(1) | (p.probs < 0).any(1) | (np.abs(p.probs.sum(1) - 1) > 1e-3))
    if len(bad):
        i = int(bad[0])
        raise WBCError(f"{path}:{i + 2}: probabilities of ID {p.ids[i]} are not a distribution "
                       f"(sum {p.probs[i].sum():.4g})")
    return p


def only_folds(oof: Probs, folds: list[int] | None, path: Path) -> Probs:
    """The OOF rows of `folds` (`ensemble.folds`, for runs that finished only some folds); None keeps every row."""
    if folds is None:
        return oof
    have = sorted(set(oof.folds.tolist()))
    missing = [f for f in folds if f not in have]
    if missing:
        raise WBCError(f"{path}: fold(s) {', '.join(map(str, missing))} of ensemble.folds not in this file "
                       f"(it covers folds {', '.join(map(str, have))})")
    return oof.subset(np.isin(oof.folds, folds))


def load_member(entry, space: str = "prob", folds: list[int] | None = None) -> Member:
    """One `ensemble.members` entry: a run folder, or a list of run folders (a seed group, see `seed_group`);
    with `folds`, only those folds' OOF rows."""
    if isinstance(entry, (list, tuple)):
        if not entry or not all(isinstance(e, (str, Path)) for e in entry):
            raise WBCError(f"ensemble.members: {entry!r} is not a run folder or a list of run folders")
        runs = [_load_run(e, folds) for e in entry]
        return seed_group(runs, space) if len(runs) > 1 else runs[0]
    if not isinstance(entry, (str, Path)):
        raise WBCError(f"ensemble.members: {entry!r} is not a run folder or a list of run folders")
    return _load_run(entry, folds)


def seed_group(runs: list[Member], space: str) -> Member:
    """Runs of one recipe (other seeds) as one member: checked like members, then averaged with equal weights in
    the blend space."""
    runs = check_members(runs)
    name = "+".join(Path(r.name).name for r in runs)
    return Member(name, runs[0].path, *seed_means(runs, space), tuple(r.path for r in runs))


def seed_means(runs, space: str = "prob") -> tuple[Probs, Probs | None, Probs]:
    """The oof, eval and test equal-weight means of runs (members or specialists) aligned to the first one."""
    w = np.full(len(runs), 1.0 / len(runs))

    def mean(split: str) -> Probs | None:
        p = getattr(runs[0], split)
        return None if p is None else Probs(p.ids, combine([getattr(r, split).probs for r in runs], w, space),
                                            list(p.classes), p.folds, p.labels)

    return mean("oof"), mean("eval"), mean("test")


def _load_run(run_dir, folds: list[int] | None = None) -> Member:
    path = resolve_path(run_dir)
    if not path.is_dir():
        raise WBCError(f"{path}: ensemble member is not a run folder")
    require_complete(path, "make predict")
    oof = _load(path / "oof.csv")
    if oof.folds is None:
        raise WBCError(f"{path / 'oof.csv'}: no fold column (is it an out-of-fold file?)")
    oof = only_folds(oof, folds, path / "oof.csv")
    _check_labels(oof, path / "oof.csv", required=True)
    ev = None
    if (path / "eval.csv").exists():
        ev = _reorder_classes(_load(path / "eval.csv"), oof.classes, path / "eval.csv")
    test = _reorder_classes(_load(path / "test.csv"), oof.classes, path / "test.csv")
    return Member(str(run_dir), path, oof, ev, test)


def _reorder_classes(p: Probs, classes: list[str], path: Path) -> Probs:
    if p.classes == classes:
        return p
    if sorted(p.classes) != sorted(classes):
        raise WBCError(f"{path}: classes {', '.join(p.classes)} differ from {', '.join(classes)}")
    cols = [p.classes.index(c) for c in classes]
    return Probs(p.ids, p.probs[:, cols], list(classes), p.folds, p.labels)


def _same_ids(p: Probs, ref: Probs, path: Path, ref_path: Path) -> Probs:
    """`p` aligned to `ref`'s row order; the ID sets must be equal."""
    ids, ref_ids = set(p.ids), set(ref.ids)
    if ids != ref_ids:
        extra, missing = sorted(ids - ref_ids), sorted(ref_ids - ids)
        what = []
        if missing:
            what.append(f"{len(missing)} ID(s) of {ref_path} missing, e.g. {missing[0]}")
        if extra:
            what.append(f"{len(extra)} ID(s) not in {ref_path}, e.g. {extra[0]}")
        raise WBCError(f"{path}: IDs differ from the first member: {'; '.join(what)}")
    return p.align(ref.ids)


def _same_folds(p: Probs, ref: Probs, path: Path, ref_path: Path) -> None:
    """Runs that finished different folds: say so, and how to blend them anyway."""
    a, b = set(p.folds.tolist()), set(ref.folds.tolist())
    if a != b:
        common = sorted(a & b)
        raise WBCError(f"{path}: covers folds {', '.join(map(str, sorted(a)))}, but {ref_path} covers "
                       f"{', '.join(map(str, sorted(b)))}: train the missing folds, or blend on the common ones "
                       f"with ensemble.folds=[{','.join(map(str, common))}]")


def _same_column(p: Probs, ref: Probs, col: str, original: Probs, path: Path, ref_path: Path) -> None:
    """`p` and `ref` are aligned; `original` is `p` in file order (to name the row)."""
    a, b = getattr(p, col), getattr(ref, col)
    diff = np.flatnonzero(a != b)
    if len(diff):
        i = int(diff[0])
        row = int(np.flatnonzero(original.ids == p.ids[i])[0]) + 2
        what = {"folds": "fold", "labels": "label"}[col]
        raise WBCError(f"{path}:{row}: ID {p.ids[i]} has {what} {a[i]}, but {what} {b[i]} in {ref_path} "
                       f"({len(diff)} ID(s) differ)")


def check_members(members: list[Member]) -> list[Member]:
    """Members aligned to the first one's ID order and class order; WBCError naming the file otherwise."""
    if not members:
        raise WBCError("ensemble: no members listed")
    ref = members[0]
    classes = ref.oof.classes
    has_eval = [m.eval is not None for m in members]
    if any(has_eval) and not all(has_eval):
        missing = members[has_eval.index(False)]
        present = members[has_eval.index(True)]
        raise WBCError(f"{missing.path / 'eval.csv'}: missing, but {present.path / 'eval.csv'} exists "
                       "(members must share the same train/eval split)")
    out = []
    for m in members:
        oof_path, test_path, ev_path = m.path / "oof.csv", m.path / "test.csv", m.path / "eval.csv"
        _same_folds(m.oof, ref.oof, oof_path, ref.path / "oof.csv")
        oof = _same_ids(_reorder_classes(m.oof, classes, oof_path), ref.oof, oof_path, ref.path / "oof.csv")
        _same_column(oof, ref.oof, "folds", m.oof, oof_path, ref.path / "oof.csv")
        _same_column(oof, ref.oof, "labels", m.oof, oof_path, ref.path / "oof.csv")
        test = _same_ids(_reorder_classes(m.test, classes, test_path), ref.test, test_path, ref.path / "test.csv")
        ev = None
        if m.eval is not None:
            ev = _same_ids(_reorder_classes(m.eval, classes, ev_path), ref.eval, ev_path, ref.path / "eval.csv")
            leak = np.intersect1d(ev.ids, oof.ids)
            if len(leak):
                raise WBCError(f"{ev_path}: {len(leak)} eval ID(s) are also in the OOF pool, e.g. {leak[0]} "
                               "(eval must be held out of training)")
            if m is not ref and ev.labels is not None and ref.eval.labels is not None:
                _same_column(ev, ref.eval, "labels", m.eval, ev_path, ref.path / "eval.csv")
        out.append(Member(m.name, m.path, oof, ev, test, m.parts))
    if ref.eval is not None:
        _check_labels(out[0].eval, ref.path / "eval.csv", required=False)
    return out


def combine(probs: list[np.ndarray], weights, space: str = "prob") -> np.ndarray:
    """Weighted mean of probabilities (`prob`) or of log-probabilities then softmax (`logit`)."""
    if space not in SPACES:
        raise WBCError(f"ensemble.blend.space: '{space}' is not one of {', '.join(SPACES)}")
    w = np.asarray(weights, dtype=np.float64)
    if space == "prob":
        return np.tensordot(w, np.stack(probs), axes=1)
    logits = np.tensordot(w, np.log(np.clip(np.stack(probs), EPS, None)), axes=1)
    return softmax(logits, axis=1)


def fit_weights(probs: list[np.ndarray], y: np.ndarray, space: str = "prob",
                sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Simplex weights minimising the class-balanced OOF log-loss of the blend (see module doc); with
    `sample_weight` (test-shift weights), images count by their weight within each class."""
    m = len(probs)
    if m == 1:
        return np.ones(1)
    y = np.asarray(y)
    n = len(y)
    iw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    sw = iw / np.bincount(y, iw)[y]
    sw /= sw.sum()
    if space == "prob":
        true = np.stack([p[np.arange(n), y] for p in probs], axis=1)

        def loss(z):
            return -(sw * np.log(np.clip(true @ softmax(z), EPS, None))).sum()
    else:
        logp = np.log(np.clip(np.stack(probs), EPS, None))

        def loss(z):
            s = np.tensordot(softmax(z), logp, axes=1)
            return -(sw * (s[np.arange(n), y] - logsumexp(s, axis=1))).sum()

    res = minimize(loss, np.zeros(m), method="L-BFGS-B")
    w = softmax(res.x)
    return w / w.sum()


def resolve_weights(spec, members: list[Member], space: str,
                    sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Blend weights from the config: `fit` (on OOF), `equal`, or a list (normalised to sum to one)."""
    if spec == "fit":
        y = members[0].oof.label_index()
        how = "fit: class-balanced OOF log-loss" + ("" if sample_weight is None else ", shift-weighted")
        return fit_weights([m.oof.probs for m in members], y, space, sample_weight), how
    if spec == "equal":
        return np.full(len(members), 1.0 / len(members)), "equal"
    if isinstance(spec, (list, tuple)):
        w = np.asarray(spec, dtype=np.float64)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise WBCError(f"ensemble.blend.weights: need {len(members)} non-negative weights, got {spec}")
        return w / w.sum(), "given"
    raise WBCError(f"ensemble.blend.weights: '{spec}' is not fit, equal or a list of numbers")


def blend(members: list[Member], weights: np.ndarray, space: str) -> tuple[Probs, Probs | None, Probs]:
    """Blended OOF (with folds, labels), eval (with labels) and test (labels empty) probabilities."""
    ref = members[0]
    classes = list(ref.oof.classes)
    oof = Probs(ref.oof.ids, combine([m.oof.probs for m in members], weights, space), classes,
                ref.oof.folds, ref.oof.labels)
    ev = None
    if ref.eval is not None:
        ev = Probs(ref.eval.ids, combine([m.eval.probs for m in members], weights, space), classes,
                   labels=ref.eval.labels if ref.eval.labels is not None else np.full(len(ref.eval.ids), ""))
    test = Probs(ref.test.ids, combine([m.test.probs for m in members], weights, space), classes,
                 labels=np.full(len(ref.test.ids), ""))
    return oof, ev, test
