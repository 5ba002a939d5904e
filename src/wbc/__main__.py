"""`python -m wbc <command>`: one entry point for every pipeline step (see `make help`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .core.console import console
from .core.errors import WBCError
from .ops.deadline import EXIT_CODE as DEADLINE_EXIT
from .ops.deadline import DeadlineReached

# Each module exposes register(subparsers): it adds its commands with set_defaults(func=...).
COMMAND_MODULES = [
    # the main path, in its order
    "wbc.s1_data.cli",
    "wbc.s2_folds.folds",
    "wbc.ops.cli",  # train-fold: train, then predict, each fold (and train-bundle, benchmark-throughput)
    "wbc.s4_predict.cli",
    "wbc.s5_ensemble.cli",
    "wbc.s6_refine.cli",
    "wbc.s7_submit.submit",
    "wbc.models.cli",
    # optional steps
    "wbc.optional.embed.cli",
    "wbc.optional.restore.cli",
    "wbc.optional.shift.cli",
    "wbc.optional.pseudo.cli",
    "wbc.optional.label_issues",
    "wbc.optional.tune_train_cli",
    "wbc.optional.crosslab",
    # operations
    "wbc.ops.bundle",
    "wbc.ops.runs",
    "wbc.ops.curves",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
    except OSError as e:  # a full disk, a read-only or vanished folder: one line naming the file, not a traceback
        what = e.strerror or str(e)
        console.print(f"[bold red]error:[/] {what}" + (f": {e.filename}" if e.filename else ""), highlight=False,
                      soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
