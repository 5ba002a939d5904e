"""Optuna tuning of the decision rule for macro-F1, with persistent studies and a nested CV estimate.

Storage specs (`--storage` / `ensemble.tuning.storage`): `sqlite:///<path>` (one process),
`journal:<path>` (a file several processes or machines on a shared filesystem can append to), or any
SQLAlchemy URL (`postgresql://...`, `mysql+pymysql://...`). Relative paths are relative to the repo root.

A study's name carries a fingerprint of its inputs (probabilities, labels, search space, seed), so rerunning
with the same inputs resumes it (up to `n_trials` finished trials in total) and changed inputs start afresh.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from ..core.config import resolve_path
from ..core.console import progress
from ..core.errors import WBCError, first_line
from ..core.metrics import macro_f1
from .blend import combine, fit_weights
from .decision import apply_rule, class_prior, make_rule, pair_key
from .specialist import apply_specialists, fit_specialists

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def make_storage(spec: str, heartbeat_s: int | None = None) -> BaseStorage:
    """A persistent Optuna storage from a spec (see module doc). `heartbeat_s` (RDB only) lets a study
    fail and retry the trials of a worker that died, instead of leaving them RUNNING forever."""
    spec = str(spec or "")
    if spec.startswith("journal:"):
        path = resolve_path(spec[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except ValueError as e:  # JSONDecodeError: a torn or foreign file; its trials cannot be trusted
            raise WBCError(f"{path}: not an Optuna journal ({first_line(e)[:120]}): delete it to start the study "
                           "afresh") from None
    if "://" not in spec:
        raise WBCError(f"storage '{spec}': use sqlite:///<path>, journal:<path> or an RDB URL")
    kwargs = {}
    if spec.startswith("sqlite:///"):
        path = resolve_path(spec[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = f"sqlite:///{path}"
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # wait out other writers' locks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat_s:
            kwargs.update(heartbeat_interval=int(heartbeat_s), grace_period=3 * int(heartbeat_s),
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        return RDBStorage(spec, **kwargs)


def open_study(storage: BaseStorage, name: str, seed: int, pruner=None, startup: int = 10) -> optuna.Study:
    """Create or resume a maximising study with a seeded TPE sampler."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner,
                                load_if_exists=True)
    # Offset by the trials already there: a resumed study reseeded as new would redraw its first random trials.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=startup)
    return study


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fingerprint(*arrays, **settings) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(np.round(a, 8) if np.asarray(a).dtype.kind == "f" else a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


@dataclass
class RuleSpace:
    """What the tuner may change (keys of `ensemble.tuning` in the config)."""

    tau_max: float = 2.0         # logit-adjustment strength range [tau_min, tau_max]; both 0 = off
    tau_min: float = 0.0         # < 0 gives back part of the prior to members that over-correct it
    bias_range: float = 2.0      # per-class log-space bias range [-r, r] on top of it; 0 = off
    thresholds_k: int = 0        # per-class probability thresholds for the k rarest classes
    threshold_min: float = 0.05  # thresholds range [threshold_min, 1]; 1 = off
    quota: bool = False          # tune the quota fraction in [0, 1]; 0 = off
    pairs: tuple = ()            # confusion pairs [[a, b], ...]: a margin each in [-pair_range, pair_range]
    pair_range: float = 1.0

    @classmethod
    def from_cfg(cls, tuning: dict) -> "RuleSpace":
        known = set(cls.__dataclass_fields__)
        space = cls(**{k: v for k, v in tuning.items() if k in known})
        space.pairs = tuple(tuple(p) for p in space.pairs or ())
        bad = [p for p in space.pairs if len(p) != 2 or p[0] == p[1]]
        if bad:
            raise WBCError(f"ensemble.tuning.pairs: each pair is two different classes, got {list(bad[0])}")
        if not space.tau_min <= 0.0 <= space.tau_max:  # tau 0 (the plain argmax) must stay reachable
            raise WBCError(f"ensemble.tuning: need tau_min <= 0 <= tau_max, got [{space.tau_min}, {space.tau_max}]")
        return space

    @property
    def tau_on(self) -> bool:
        return self.tau_min < self.tau_max


def rare_classes(prior: np.ndarray, k: int) -> list[int]:
    return [int(c) for c in np.argsort(prior, kind="stable")[:k]]


def rule_from_params(p: dict, classes: list[str], prior: np.ndarray, space: RuleSpace) -> dict:
    """Decision rule from a trial's parameters (missing ones: off)."""
    bias = -p.get("tau", 0.0) * np.log(prior) + np.array([p.get(f"b_{c}", 0.0) for c in classes])
    thr = {c: p[f"t_{c}"] for c in classes if p.get(f"t_{c}", 1.0) < 1.0}
    pairs = {pair_key(a, b): p.get(f"m_{a}_{b}", 0.0) for a, b in space.pairs}
    return make_rule(classes, bias, thr, p.get("quota", 0.0), prior, pairs)


def _suggest(trial: optuna.Trial, classes: list[str], prior: np.ndarray, space: RuleSpace) -> dict:
    p = {}
    if space.tau_on:
        p["tau"] = trial.suggest_float("tau", space.tau_min, space.tau_max)
    if space.bias_range > 0:
        for c in classes:
            p[f"b_{c}"] = trial.suggest_float(f"b_{c}", -space.bias_range, space.bias_range)
    for i in rare_classes(prior, space.thresholds_k):
        p[f"t_{classes[i]}"] = trial.suggest_float(f"t_{classes[i]}", space.threshold_min, 1.0)
    if space.quota:
        p["quota"] = trial.suggest_float("quota", 0.0, 1.0)
    for a, b in space.pairs:
        p[f"m_{a}_{b}"] = trial.suggest_float(f"m_{a}_{b}", -space.pair_range, space.pair_range)
    return p


def _start_points(classes: list[str], prior: np.ndarray, space: RuleSpace) -> list[dict]:
    """Plain argmax, then logit adjustment (tau=1): the tuned rule can only match or beat them in-sample."""
    base = {}
    if space.bias_range > 0:
        base.update({f"b_{c}": 0.0 for c in classes})
    base.update({f"t_{classes[i]}": 1.0 for i in rare_classes(prior, space.thresholds_k)})
    if space.quota:
        base["quota"] = 0.0
    base.update({f"m_{a}_{b}": 0.0 for a, b in space.pairs})
    if not space.tau_on:
        return [base]
    return [dict(base, tau=0.0)] + ([dict(base, tau=1.0)] if space.tau_max >= 1.0 else [])


def tune_rule(probs: np.ndarray, y: np.ndarray, classes: list[str], space: RuleSpace, *, storage: BaseStorage,
              study_prefix: str, n_trials: int, seed: int, prior: np.ndarray | None = None,
              desc: str = "tune rule", sample_weight: np.ndarray | None = None) -> tuple[dict, optuna.Study]:
    """Rule maximising macro-F1 of `apply_rule(probs)` against `y` (weighted by `sample_weight` when given).
    The study (named `<prefix>-<fingerprint>`) resumes from `storage` and runs until it holds `n_trials`
    finished trials."""
    n_cls = len(classes)
    y = np.asarray(y)
    prior = class_prior(y, n_cls) if prior is None else np.asarray(prior)
    arrays = (probs, y, prior) + (() if sample_weight is None else (sample_weight,))
    missing = sorted({c for pair in space.pairs for c in pair} - set(classes))
    if missing:
        raise WBCError(f"ensemble.tuning.pairs: {', '.join(missing)} not among the classes {', '.join(classes)}")
    settings = asdict(space)
    if not space.pairs:  # studies tuned before pairs existed keep their names (and resume)
        settings.pop("pairs"), settings.pop("pair_range")
    name = f"{study_prefix}-{fingerprint(*arrays, classes=classes, seed=seed, **settings)}"
    study = open_study(storage, name, seed)
    if not study.trials:
        for params in _start_points(classes, prior, space):
            study.enqueue_trial(params)

    def objective(trial: optuna.Trial) -> float:
        rule = rule_from_params(_suggest(trial, classes, prior, space), classes, prior, space)
        return macro_f1(y, apply_rule(probs, rule), n_cls, sample_weight)

    todo = n_trials - n_finished(study)
    if todo > 0:
        with progress() as bar:
            task = bar.add_task(desc, total=todo, info="")
            study.optimize(objective, n_trials=todo, callbacks=[
                lambda s, t: bar.update(task, advance=1, info=f"best {s.best_value:.4f}")])
    return rule_from_params(study.best_params, classes, prior, space), study


def nested_estimate(member_probs: list[np.ndarray], y: np.ndarray, folds: np.ndarray, classes: list[str],
                    space: RuleSpace, *, weights: np.ndarray | None, blend_space: str, storage: BaseStorage,
                    study_prefix: str, n_trials: int, seed: int, sample_weight: np.ndarray | None = None,
                    specialists: list[np.ndarray] = (), groups: list[list[int]] = (),
                    specialist_fit: str = "macro_f1") -> dict:
    """Honest macro-F1 of the whole recipe: for each OOF fold, fit the blend weights (`weights=None`), the
    specialists' weights and the rule on the other folds, then predict the held-out fold; score the pooled
    predictions. `blend_macro_f1` scores the same out-of-fold blends with a plain argmax (no tuned rule). With
    `sample_weight`, fitting, tuning and scores are all weighted; `*_unweighted` keep the plain scores."""
    y, folds = np.asarray(y), np.asarray(folds)
    sw = sample_weight
    n_cls = len(classes)
    pred, pred_blend = np.full(len(y), -1), np.full(len(y), -1)
    per_fold, fold_weights, fold_spec_weights = {}, {}, {}
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        if not tr.any():
            raise WBCError("nested estimate needs at least two OOF folds")
        sw_tr = None if sw is None else sw[tr]
        w = fit_weights([p[tr] for p in member_probs], y[tr], blend_space, sw_tr) if weights is None else weights
        probs = combine(member_probs, w, blend_space)
        if len(specialists):
            sws = fit_specialists(probs[tr], [s[tr] for s in specialists], groups, y[tr], sw_tr, specialist_fit)
            probs = apply_specialists(probs, specialists, groups, sws)
            fold_spec_weights[int(k)] = sws
        rule, _ = tune_rule(probs[tr], y[tr], classes, space, storage=storage, study_prefix=f"{study_prefix}-f{k}",
                            n_trials=n_trials, seed=seed, desc=f"nested fold {k}", sample_weight=sw_tr)
        pred[te] = apply_rule(probs[te], rule)
        pred_blend[te] = probs[te].argmax(1)
        per_fold[int(k)] = macro_f1(y[te], pred[te], n_cls, None if sw is None else sw[te])
        fold_weights[int(k)] = [float(v) for v in w]
    out = {"macro_f1": macro_f1(y, pred, n_cls, sw), "blend_macro_f1": macro_f1(y, pred_blend, n_cls, sw),
           "fold_macro_f1": per_fold, "fold_weights": fold_weights, "pred": pred, "pred_blend": pred_blend}
    if len(specialists):
        out["fold_specialist_weights"] = fold_spec_weights
    if sw is not None:
        out.update(macro_f1_unweighted=macro_f1(y, pred, n_cls),
                   blend_macro_f1_unweighted=macro_f1(y, pred_blend, n_cls))
    return out
