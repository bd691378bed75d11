"""`deit3-fast` command line. Each sub-command is a module of deit3_fast/commands/ (its options and its handler);
this builds the parser from them, runs the chosen one, and turns what a user can fix into one line and its exit
code (2 for input errors).

Start-up: parsing imports only the chosen command's module, and a command module imports torch, timm and the data
engines only when it runs, so `--help`, a command's `--help` and a mistyped command answer without them.
"""

from __future__ import annotations

import argparse
import sys

from dataset_tools.errors import UserError

from . import __version__, commands


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `command` that of the top level and this one command only."""
    p = argparse.ArgumentParser(prog="deit3-fast", description="DeiT III training at GPU speed.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands.COMMANDS if command is None else (command,):
        module = commands.load(name)
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION))
    return p


def _preempted(e: Exception) -> bool:
    # Only the trainer raises Preempted, so it is imported whenever one is in flight; looking it up in sys.modules
    # keeps torch out of the commands that never train.
    trainer = sys.modules.get(f"{__package__}.trainer")
    return trainer is not None and isinstance(e, trainer.Preempted)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A known command first: only its options are needed. Anything else (--help, --version, a typo, nothing) gets
    # the whole parser, for the list of commands or the error that names them.
    parser = build_parser(argv[0] if argv and argv[0] in commands.COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    try:
        if hasattr(args, "set"):  # a command with --set: a space for its `=` is named before argparse's error
            from .config import check_set_syntax

            check_set_syntax(argv)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")  # what parse_args says
        return commands.load(args.command).run(args)
    except UserError as e:
        print(f"deit3-fast: {e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("deit3-fast: interrupted; the last completed epoch's checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as e:
        if not _preempted(e):
            raise
        print(f"deit3-fast: {e}", file=sys.stderr)  # a scheduler's SIGTERM: the position is saved, stopping was asked
        return 0
    finally:
        # A process group exists only if distributed.py was imported (by a command that trains or evaluates).
        dist = sys.modules.get(f"{__package__}.distributed")
        if dist is not None:
            dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
