"""The one place a rich Console is built, for deit3-convert's and deit3-fast's tables, summaries and progress.

Rich sizes a console that is not a terminal (a pipe, a file, a CI or Slurm log) at 80 columns, or at the width of
whatever terminal the process was started from, and cuts a wider table's cells with an ellipsis. Such output is read
later or parsed, so it gets COLUMNS where that is set and otherwise a width none of the tables reaches; a terminal
keeps its own width.
"""

from __future__ import annotations

import os
from typing import IO

from rich.console import Console

UNCUT_WIDTH = 200  # wider than any table the commands print (doctor's fixes and zoo's rows are the widest)


def make_console(stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A console on stdout (stderr with `stderr`, or `file`) as wide as its output can use without cutting."""
    console = Console(stderr=stderr, file=file)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = UNCUT_WIDTH
    return console
