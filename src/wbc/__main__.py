"""`python -m wbc <command>`: one entry point for every pipeline step (see `make help`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from rich.markup import escape

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
    "wbc.optional.ssl.cli",
    # operations
    "wbc.ops.bundle",
    "wbc.ops.runs",
    "wbc.ops.curves",
    "wbc.ops.jobs",
]


class Parser(argparse.ArgumentParser):
    """Command-line mistakes (`--fold a`, a missing argument) as one `error:` line like every other bad input."""

    def error(self, message):
        console.print(f"[bold red]error:[/] {escape(self.prog)}: {escape(message)} (`{escape(self.prog)} -h` lists the "
                      "arguments)", highlight=False, soft_wrap=True)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="wbc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WBCError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # '[a,b]' is no markup
        return 2
    except DeadlineReached as e:
        console.print(f"[yellow]deadline:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return DEADLINE_EXIT
    except OSError as e:  # a full disk, a read-only or vanished folder: one line naming the file, not a traceback
        what = e.strerror or str(e)
        console.print(f"[bold red]error:[/] {escape(what)}" + (f": {escape(str(e.filename))}" if e.filename else ""),
                      highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
