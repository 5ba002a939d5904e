"""Shared command-line plumbing: every sub-command takes `--config` and trailing `key=value` overrides."""
from __future__ import annotations

import argparse

from .config import load_config


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    p.add_argument("--config", "-c", default=default, help="experiment YAML (default: configs/base.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=3")
    return p


def config_from_args(args: argparse.Namespace) -> dict:
    return load_config(args.config, args.overrides)


def positive_int(text: str) -> int:
    """An argparse type: a count that must be at least 1 (`--images 0` would fail later, deep in the work)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n
