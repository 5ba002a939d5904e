"""`python -m wbc pretrain-ssl` (self-supervised pretraining of a backbone) and `python -m wbc select-ssl` (the
prototype-guided image selection for it)."""
from __future__ import annotations

import argparse
import os

from ...core.cli import add_config_args
from ...core.config import CONFIG_DIR

DEFAULT_CONFIG = str(CONFIG_DIR / "steps" / "ssl_tiny_cpu.yaml")


def _config(args: argparse.Namespace) -> dict:
    from .settings import load_ssl_config

    return load_ssl_config(args.config, args.overrides)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .train import run_pretrain

    run_pretrain(_config(args), resume=args.resume)


def cmd_select(args: argparse.Namespace) -> None:
    from .select import run_select

    run_select(_config(args))


def register(sub) -> None:
    p = add_config_args(sub.add_parser(
        "pretrain-ssl", help="self-supervised pretraining (DINO / FastSiam) of the config's backbone on unlabelled "
                             "cells -> outputs/<name>/backbone.pt"), DEFAULT_CONFIG)
    p.add_argument("--resume", action="store_true", default=os.environ.get("RESUME") == "1",
                   help="go on after the last saved epoch (also RESUME=1)")
    p.set_defaults(func=cmd_pretrain)
    p = add_config_args(sub.add_parser(
        "select-ssl", help="prototype-guided, density-aware choice of pretraining images -> "
                           "outputs/<name>_select/selected.csv"), DEFAULT_CONFIG)
    p.set_defaults(func=cmd_select)
