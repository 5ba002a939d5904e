"""The `ensemble` command."""
from __future__ import annotations

import argparse

from ..core.cli import add_config_args, config_from_args
from ..core.config import CONFIG_DIR

DEFAULT_ENSEMBLE = str(CONFIG_DIR / "ensemble" / "sample.yaml")


def cmd_ensemble(args: argparse.Namespace) -> None:
    from .run import run_ensemble

    run_ensemble(config_from_args(args))


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="blend runs, tune the macro-F1 decision rule on OOF, write a submission")
    add_config_args(p, default=DEFAULT_ENSEMBLE)
    p.set_defaults(func=cmd_ensemble)
