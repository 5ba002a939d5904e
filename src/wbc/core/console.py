"""Rich console, progress bars (quiet when not a terminal) and result tables."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Long lines stay whole in logs; a log or pipe gets 160 columns (rich's 80 would cut the tables' cells).
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))


def progress(transient: bool = True) -> Progress:
    """A progress bar that draws only on a terminal, so logs and CI stay clean."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                    transient=transient, disable=not sys.stdout.isatty())


def table(title: str, columns: list[str], rows: list[list], floatfmt: str = "{:.4f}") -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c), justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[floatfmt.format(v) if isinstance(v, float) else str(v) for v in r])
    return t


def print_table(title: str, columns: list[str], rows: list[list], floatfmt: str = "{:.4f}") -> None:
    console.print(table(title, columns, rows, floatfmt))
