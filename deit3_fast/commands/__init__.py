"""The `deit3-fast` sub-commands, one module each: `NAME`, `HELP` (its line in `deit3-fast --help`), `DESCRIPTION`
(its own --help), `add_arguments(parser)` and `run(args) -> int`. Adding a command is its module here plus its entry
in `COMMANDS`; cli.py builds the parser from them.

A command module is imported to parse its options, also for `--help`, so at its top it imports only what that needs
(argparse-level: no torch, timm or data engines); its `run` imports the rest. `_common` holds what several commands
share.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Module names, which are the command names, in the order `deit3-fast --help` lists them. Names, not modules: main
# imports only the module of the command it runs.
COMMANDS = (
    "train",
    "eval",
    "submit",
    "quickstart",
    "profile",
    "doctor",
    "preview",
    "zoo",
    "compare",
    "export",
    "stage",
    "ablate",
    "parity",
)


def load(name: str) -> ModuleType:
    """The module of command `name` (one of COMMANDS)."""
    return importlib.import_module(f"{__name__}.{name}")
