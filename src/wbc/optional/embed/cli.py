"""`python -m wbc embed` (train head, export embeddings, fit classifiers) and `python -m wbc fewshot`."""
from __future__ import annotations

import argparse
import os

from ...core.cli import add_config_args, config_from_args
from ...core.config import CONFIG_DIR

DEFAULT_CONFIG = str(CONFIG_DIR / "steps" / "embed_tiny_cpu.yaml")


def cmd_embed(args: argparse.Namespace) -> None:
    from .run import run_embed

    run_embed(config_from_args(args), resume=args.resume)


def cmd_fewshot(args: argparse.Namespace) -> None:
    from .run import run_fewshot

    run_fewshot(config_from_args(args))


def register(sub) -> None:
    p = add_config_args(sub.add_parser(
        "embed", help="contrastive embeddings per fold + prototype / k-NN / linear classifiers on them"),
        DEFAULT_CONFIG)
    p.add_argument("--resume", action="store_true", default=os.environ.get("RESUME") == "1",
                   help="go on from each fold's last saved epoch (also RESUME=1)")
    p.set_defaults(func=cmd_embed)
    p = add_config_args(sub.add_parser(
        "fewshot", help="N-way K-shot episodes and the labels-per-class protocol on `embed` outputs"),
        DEFAULT_CONFIG)
    p.set_defaults(func=cmd_fewshot)
