"""The command line's wiring: one module per command, all of them in the one list, and start-up that imports only
what the chosen command needs (the commands' options, help texts and exit codes are asserted where each is tested)."""

from __future__ import annotations

import argparse
import json
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from deit3_fast import cli, commands

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision", "numpy", "numba", "ffcv", "nvidia.dali")

# Runs `python -m MODULE ARGV` for each ARGV in one process, as -m does (runpy), then reports each exit code,
# which heavy packages got imported and which command modules.
_RUN = """
import json, runpy, sys
codes = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["deit3-fast", *argv]
    try:
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        codes.append(e.code)
with open(REPORT, "w") as f:
    json.dump({"codes": codes, "heavy": [m for m in HEAVY if m in sys.modules],
               "commands": sorted(m for m in sys.modules if m.startswith("deit3_fast.commands."))}, f)
"""


def _imports(tmp_path, *argvs: list[str], module: str = "deit3_fast") -> dict:
    report = tmp_path / "report.json"
    script = f"REPORT = {str(report)!r}\nHEAVY = {HEAVY!r}\nMODULE = {module!r}\n" + _RUN
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(report.read_text())


def test_help_and_a_mistyped_command_import_no_torch(tmp_path):
    """`--help`, a typo, no command and each command's --help answer without torch, timm or the engines (seconds of
    start-up): every command module is torch-free at import, and the top-level parser needs them all."""
    argvs = [["--help"], ["trian"], [], *([name, "--help"] for name in commands.COMMANDS)]
    seen = _imports(tmp_path, *argvs)
    assert seen["codes"] == [0, 2, 2, *[0] * len(commands.COMMANDS)]
    assert seen["heavy"] == []
    assert seen["commands"] == sorted(f"deit3_fast.commands.{m}" for m in ("_common", *commands.COMMANDS))


def test_convert_help_and_a_mistyped_option_import_no_torch(tmp_path):
    """deit3-convert answers --help, an unknown option and a missing argument without torch, timm or the engines
    (it never needs them: it writes .betons with its own writer)."""
    argvs = [["--help"], ["--no-such-option"], [], ["--max-resolution"]]
    seen = _imports(tmp_path, *argvs, module="dataset_tools.convert")
    assert seen["codes"] == [0, 2, 2, 2]
    assert [m for m in seen["heavy"] if m != "numpy"] == []  # numpy: its writer's arrays, imported with it


def test_a_command_imports_only_its_own_module(tmp_path):
    seen = _imports(tmp_path, ["train", "--help"])
    assert seen == {"codes": [0], "heavy": [], "commands": ["deit3_fast.commands._common", "deit3_fast.commands.train"]}


def test_every_command_module_is_in_the_one_list():
    """A module in deit3_fast/commands/ is a command (helpers start with `_`); each is listed once in COMMANDS under
    its module name (main finds it by that name) and has the command interface; the parser offers exactly those."""
    found = {m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")}
    assert sorted(found - set(commands.COMMANDS)) == [], "command modules missing from COMMANDS"
    assert sorted(set(commands.COMMANDS) - found) == [], "COMMANDS entries without a module"
    assert len(set(commands.COMMANDS)) == len(commands.COMMANDS), "a command listed twice"
    for name in commands.COMMANDS:
        module = commands.load(name)
        assert module.NAME == name
        assert isinstance(module.HELP, str) and module.HELP and isinstance(module.DESCRIPTION, str)
        assert callable(module.add_arguments) and callable(module.run)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(commands.COMMANDS)


def test_a_command_is_its_module_and_one_entry(monkeypatch, capsys):
    """What adding a command takes, and all it takes: a module with the interface, and its name in COMMANDS."""
    hello = types.ModuleType("deit3_fast.commands.hello")
    hello.NAME, hello.HELP, hello.DESCRIPTION = "hello", "greet someone", "Greets --who."
    hello.add_arguments = lambda p: p.add_argument("--who", required=True)
    hello.run = lambda args: print(f"hello {args.who}") or 7
    monkeypatch.setitem(sys.modules, hello.__name__, hello)
    monkeypatch.setattr(commands, "COMMANDS", (*commands.COMMANDS, "hello"))
    assert cli.main(["hello", "--who", "you"]) == 7
    assert capsys.readouterr().out == "hello you\n"
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0 and "    hello     greet someone\n" in capsys.readouterr().out


def _undocumented(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """`prog OPTION` for each argument of `parser` (and of its sub-commands) that --help lists without a word."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undocumented(sub, f"{prog} {name}")
        elif action.help != argparse.SUPPRESS and not (action.help or "").strip():
            missing.append(f"{prog} {'/'.join(action.option_strings) or action.metavar or action.dest}")
    return missing


def test_every_option_of_every_command_says_what_it_does():
    """Each option and positional argument of deit3-fast's commands and of deit3-convert has a help text in --help."""
    from dataset_tools.convert import build_parser as convert_parser

    assert _undocumented(cli.build_parser(), "deit3-fast") + _undocumented(convert_parser(), "deit3-convert") == []


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["train", "--cfg", "quickstart", "--set", "optim.lr", "1e-3"],
            "--set takes KEY=VALUE (got 'optim.lr' then '1e-3'): write --set optim.lr=1e-3",
        ),
        # eval would take the value for its RUN_DIR and look for a checkpoint there
        (
            ["eval", "--set", "optim.lr", "1e-3"],
            "--set takes KEY=VALUE (got 'optim.lr' then '1e-3'): write --set optim.lr=1e-3",
        ),
        (
            ["profile", "--cfg", "quickstart", "--set=optim.lr", "1e-3"],
            "--set takes KEY=VALUE (got 'optim.lr' then '1e-3'): write --set optim.lr=1e-3",
        ),
        (
            ["ablate", "--grid", "cifar10_grid", "--set", "aug.mixup", "--quiet"],
            "--set takes KEY=VALUE (got 'aug.mixup'): write --set aug.mixup=VALUE",
        ),
    ],
)
def test_a_space_for_sets_equals_is_one_line_naming_the_fix(argv, said, capsys):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"deit3-fast: error: {said}\n"


def test_other_unknown_arguments_are_still_argparses_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--cfg", "quickstart", "--set", "optim.lr=1e-3", "--bogus", "1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith("deit3-fast: error: unrecognized arguments: --bogus 1\n")
