"""`make tune-train`: an Optuna study over training-time class handling (class-weight exponent, sampler power,
focal gamma, logit-adjustment tau, augmentation strength, ...). Each trial is one short fold training
(`wbc.s3_train.loop.train_fold`), pruned on its per-epoch validation macro-F1. One process runs one trial at
a time (one GPU); more workers join by pointing at the same journal file or RDB URL (docs/ensemble.md).

`n_trials` is the study's total of finished (complete + pruned) trials: every worker stops when the study
reaches it, and rerunning a command resumes the study up to it.
"""
from __future__ import annotations

import copy
import os
import socket
import zlib
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
from optuna.study import MaxTrialsCallback

from ..core.config import (
    display_path,
    dump_config,
    get_dotted,
    load_config,
    read_yaml,
    resolve_path,
    set_dotted,
)
from ..core.console import console, print_table
from ..core.errors import TrainingDiverged, WBCError
from ..core.io import write_csv, write_json, write_text
from ..core.run_folder import fold_dir, run_dir
from ..s5_ensemble.tune import FINISHED, make_storage, n_finished, open_study

DEFAULT_STORAGE = "sqlite:///outputs/tune_train.db"
STUDY_KEYS = {"study_name", "storage", "heartbeat_s", "n_trials", "n_startup_trials", "seed", "fold", "epochs",
              "keep_checkpoints", "pruner", "fixed", "search_space", "baseline"}
_MISSING = object()


def load_study_config(path) -> dict:
    path = Path(path)
    cfg = read_yaml(path)
    check_study_config(cfg, str(path))
    return cfg


def check_study_config(cfg: dict, where: str = "study config") -> None:
    unknown = sorted(set(cfg) - STUDY_KEYS)
    if unknown:
        raise WBCError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(STUDY_KEYS))})")
    if not isinstance(cfg.get("search_space"), dict) or not cfg["search_space"]:
        raise WBCError(f"{where}: needs a non-empty `search_space` mapping")


def check_space(space: dict, train_cfg: dict) -> None:
    """Every searched, fixed or conditioned key must exist in the training config (catches typos)."""
    for key, spec in space.items():
        if get_dotted(train_cfg, key, _MISSING) is _MISSING:
            raise WBCError(f"search_space: '{key}' is not a key of the training config")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise WBCError(f"search_space.{key}: needs type float | int | categorical")
        for cond in (spec.get("when") or {}):
            if cond not in space and get_dotted(train_cfg, cond, _MISSING) is _MISSING:
                raise WBCError(f"search_space.{key}.when: '{cond}' is not a key of the training config")


def check_baseline(baseline: dict, space: dict) -> None:
    for key, val in baseline.items():
        if key not in space:
            raise WBCError(f"baseline: '{key}' is not a key of the search space")
        spec = space[key]
        ok = val in spec["choices"] if spec["type"] == "categorical" else spec["low"] <= val <= spec["high"]
        if not ok:
            raise WBCError(f"baseline: {key}={val} lies outside its search space")


def suggest(trial: optuna.Trial, space: dict, train_cfg: dict) -> dict:
    """Dotted config key -> sampled value; a key whose `when` conditions fail is not sampled."""
    out = {}
    for key, spec in space.items():
        when = spec.get("when") or {}
        if any(out.get(k, get_dotted(train_cfg, k)) != v for k, v in when.items()):
            continue
        if spec["type"] == "categorical":
            out[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            out[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            out[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
    return out


def make_pruner(spec: dict | None, epochs: int) -> optuna.pruners.BasePruner:
    spec = dict(spec or {"type": "median"})
    kind = spec.pop("type", "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.get("n_startup_trials", 5),
                                           n_warmup_steps=spec.get("n_warmup_steps", 1))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.get("min_resource", 1), max_resource=epochs,
                                              reduction_factor=spec.get("reduction_factor", 3))
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise WBCError(f"pruner.type: '{kind}' is not median, hyperband or none")


def worker_tag() -> str:
    """Who ran a trial: `WBC_WORKER`, else host and visible GPU(s)."""
    return os.environ.get("WBC_WORKER") or f"{socket.gethostname()}/gpu{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"


def _default_train_fn():
    from ..s3_train.loop import train_fold

    return train_fold


def run_tune_train(train_config, overrides, study_cfg: dict, *, storage: str | None = None,
                   n_trials: int | None = None, study_name: str | None = None,
                   train_fn: Callable | None = None) -> optuna.Study:
    """Run (or join, or resume) the study; returns it after this worker stops."""
    check_study_config(study_cfg)
    base = load_config(train_config, list(overrides))
    space, fixed = study_cfg["search_space"], study_cfg.get("fixed") or {}
    for key in fixed:
        if get_dotted(base, key, _MISSING) is _MISSING:
            raise WBCError(f"fixed: '{key}' is not a key of the training config")
    check_space(space, base)
    baseline = study_cfg.get("baseline") or {}
    check_baseline(baseline, space)
    epochs = int(study_cfg.get("epochs", 8))
    fold = int(study_cfg.get("fold", 0))
    keep_checkpoints = bool(study_cfg.get("keep_checkpoints", False))
    n_trials = int(n_trials or study_cfg.get("n_trials", 40))
    name = study_name or study_cfg.get("study_name") or f"tune_train-{base['name']}"
    spec = storage or study_cfg.get("storage") or DEFAULT_STORAGE
    worker = worker_tag()
    # Workers share the seed's intent but not its draws: identical seeds would repeat each other's trials.
    seed = int(study_cfg.get("seed", base.get("seed", 42))) + zlib.crc32(worker.encode()) % 100_000
    study = open_study(make_storage(spec, heartbeat_s=study_cfg.get("heartbeat_s")), name, seed,
                       pruner=make_pruner(study_cfg.get("pruner"), epochs),
                       startup=int(study_cfg.get("n_startup_trials", 8)))
    if baseline and not study.trials:
        # The current recipe runs first, under the same fold, epochs and pruning: the study's gain is measured
        # against it rather than against nothing.
        study.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
    train_fn = train_fn or _default_train_fn()

    def objective(trial: optuna.Trial) -> float:
        cfg = load_config(train_config, list(overrides))
        for key, val in fixed.items():
            set_dotted(cfg, key.split("."), val)
        params = suggest(trial, space, cfg)
        for key, val in params.items():
            set_dotted(cfg, key.split("."), val)
        cfg["name"] = f"{name}_t{trial.number:04d}"
        set_dotted(cfg, ["train", "epochs"], epochs)
        # The objective is the per-epoch validation; the fold's closing test-time predictions only cost time.
        set_dotted(cfg, ["predict", "tta"], 1)
        trial.set_user_attr("run", cfg["name"])
        trial.set_user_attr("worker", worker)

        def on_epoch(epoch: int, metrics: dict) -> None:
            value = float(metrics["val_macro_f1"])
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: val macro-F1 {value:.4f}")

        try:
            result = train_fn(cfg, fold, on_epoch=on_epoch)
        except TrainingDiverged as e:  # a recipe that blows up is a bad trial, not a broken study
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            if not keep_checkpoints:  # a trial's weights are not reused; they would fill the disk
                for f in fold_dir(run_dir(cfg), fold).glob("*.pt"):
                    f.unlink()
        return float(result["best_macro_f1"])

    todo = n_trials - n_finished(study)
    console.print(f"[bold]tune-train[/] study {name} ({spec}): {n_finished(study)}/{n_trials} trials finished; "
                  f"worker {worker}")
    if todo > 0:
        study.optimize(objective, n_trials=todo, callbacks=[MaxTrialsCallback(n_trials, states=FINISHED)])
    _write_results(study, fixed, resolve_path(base.get("output_dir") or "outputs") / "tune_train" / name, base, fold)
    return study


def best_config(base: dict, fixed: dict, params: dict, name: str) -> dict:
    """The training config with the study's fixed keys and a trial's params, at the config's own epochs."""
    cfg = copy.deepcopy(base)
    for key, val in {**fixed, **params}.items():
        set_dotted(cfg, key.split("."), val)
    cfg["name"] = name
    return cfg


def _write_results(study: optuna.Study, fixed: dict, out: Path, base: dict, fold: int) -> None:
    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value,
             "epochs": len(t.intermediate_values), "worker": t.user_attrs.get("worker", ""),
             **{f"param:{k}": v for k, v in t.params.items()}} for t in trials]
    write_csv(out / "trials.csv", pd.DataFrame(rows))
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return
    best = study.best_trial
    overrides = [f"{k}={v}" for k, v in {**fixed, **best.params}.items()]
    summary = {"study": study.study_name, "number": best.number, "value": best.value, "params": best.params,
               "overrides": overrides}
    base_trial = next((t for t in done if t.user_attrs.get("baseline")), None)
    if base_trial is not None:
        summary["baseline"] = {"number": base_trial.number, "value": base_trial.value, "params": base_trial.params}
        summary["gain_over_baseline"] = best.value - base_trial.value
    write_json(out / "best.json", summary)
    # A config to confirm the winner on every fold: its gain was selected on one fold, so it is optimistic.
    header = (f"# {study.study_name}: best trial {best.number}, val macro-F1 {best.value:.4f} on fold {fold}.\n"
              f"# Confirm on every fold: make train-all predict CONFIG={display_path(out / 'best.yaml')}\n")
    best_cfg = best_config(base, fixed, best.params, f"{study.study_name}_best")
    write_text(out / "best.yaml", header + dump_config(best_cfg))
    top = sorted(done, key=lambda t: -t.value)[:10]
    keys = list(best.params)
    print_table(f"tune-train {study.study_name}: top trials ({len(done)} complete, "
                f"{sum(t.state.name == 'PRUNED' for t in trials)} pruned)",
                ["trial", "val macro-F1"] + keys,
                [[t.number, t.value] + [t.params.get(k, "") for k in keys] for t in top])
    console.print(f"best overrides: {' '.join(overrides)}")
    if base_trial is not None:
        console.print(f"baseline trial {base_trial.number}: {base_trial.value:.4f}; best {best.value:.4f} "
                      f"({summary['gain_over_baseline']:+.4f}, selected on this fold: confirm on all folds)")

