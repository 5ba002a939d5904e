"""Commands `ensemble` and `tune-train`."""
from __future__ import annotations

import argparse

from ..cli_common import add_config_args, config_from_args
from ..config import CONFIG_DIR

DEFAULT_ENSEMBLE = str(CONFIG_DIR / "ensemble" / "sample.yaml")
DEFAULT_STUDY = str(CONFIG_DIR / "tune_train.yaml")


def cmd_ensemble(args: argparse.Namespace) -> None:
    from .run import run_ensemble

    run_ensemble(config_from_args(args))


def cmd_tune_train(args: argparse.Namespace) -> None:
    from .tune_train import load_study_config, run_tune_train

    run_tune_train(args.config, args.overrides, load_study_config(args.study_config), storage=args.storage,
                   n_trials=args.n_trials, study_name=args.study_name)


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="blend runs, tune the macro-F1 decision rule on OOF, write a submission")
    add_config_args(p, default=DEFAULT_ENSEMBLE)
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("tune-train", help="Optuna study over training-time class handling (pruned fold trainings)")
    add_config_args(p)
    p.add_argument("--study-config", default=DEFAULT_STUDY,
                   help="search space, pruner, trials (default configs/tune_train.yaml)")
    p.add_argument("--storage", default=None,
                   help="sqlite:///<path> | journal:<path> | RDB URL, shared by parallel workers "
                        "(default: the study config's)")
    p.add_argument("--n-trials", type=int, default=None, help="total finished trials the study should reach")
    p.add_argument("--study-name", default=None, help="default: tune_train-<train config name>")
    p.set_defaults(func=cmd_tune_train)
