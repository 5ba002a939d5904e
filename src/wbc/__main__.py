"""`python -m wbc <command>`: one entry point for every pipeline step (see `make help`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .console import console
from .errors import WBCError
from .train.deadline import EXIT_CODE as DEADLINE_EXIT
from .train.deadline import DeadlineReached

# Each module exposes register(subparsers): it adds its commands with set_defaults(func=...).
COMMAND_MODULES = [
    "wbc.data.cli",
    "wbc.folds",
    "wbc.train.cli",
    "wbc.predict.cli",
    "wbc.embed.cli",
    "wbc.restore.cli",
    "wbc.ensemble.cli",
    "wbc.refine.cli",
    "wbc.shift.cli",
    "wbc.pseudo.cli",
    "wbc.submit",
    "wbc.bundle",
    "wbc.runs",
    "wbc.label_issues",
    "wbc.models.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a step not built yet; everything else is a real error
                continue
            raise
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WBCError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except DeadlineReached as e:
        console.print(f"[yellow]deadline:[/] {e}", highlight=False, soft_wrap=True)
        return DEADLINE_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
