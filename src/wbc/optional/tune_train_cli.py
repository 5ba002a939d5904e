"""The `tune-train` command (Optuna loads only when it runs)."""
from __future__ import annotations

from ..core.cli import add_config_args
from ..core.config import CONFIG_DIR


def _run(args) -> None:
    from .tune_train import load_study_config, run_tune_train

    run_tune_train(args.config, args.overrides, load_study_config(args.study_config), storage=args.storage,
                   n_trials=args.n_trials, study_name=args.study_name)


def register(sub) -> None:
    p = sub.add_parser("tune-train", help="Optuna study over training-time class handling (pruned fold trainings)")
    add_config_args(p)
    p.add_argument("--study-config", default=str(CONFIG_DIR / "steps" / "tune_train.yaml"),
                   help="search space, pruner, trials (default configs/steps/tune_train.yaml)")
    p.add_argument("--storage", default=None,
                   help="sqlite:///<path> | journal:<path> | RDB URL, shared by parallel workers "
                        "(default: the study config's)")
    p.add_argument("--n-trials", type=int, default=None, help="total finished trials the study should reach")
    p.add_argument("--study-name", default=None, help="default: tune_train-<train config name>")
    p.set_defaults(func=_run)
