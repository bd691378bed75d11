"""Tables printed to a pipe, a file or a log (not a terminal) keep every character: rich would size such a console
at 80 columns and cut the cells of a wider table with an ellipsis."""

import io

from rich.table import Table

from dataset_tools.console import UNCUT_WIDTH, make_console
from deit3_fast.doctor import render

LONG_PATH = "/scratch/some-user/datasets/imagenet-1k/converted-2026-12/validation/val_s448.beton"  # 83 characters
FIX = "convert it again: deit3-convert SRC OUT.beton --short-side 448"


def test_a_wide_table_printed_to_a_file_is_not_cut(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    table = Table("check", "detail", "fix")
    table.add_row("data", LONG_PATH, FIX)
    make_console(file=out).print(table)
    text = out.getvalue()
    assert "…" not in text
    assert LONG_PATH in text and FIX in text  # each on one line, not wrapped


def test_a_command_table_through_a_pipe_is_not_cut(monkeypatch, capsys):
    """doctor's table as `deit3-fast doctor | tee doctor.txt` gets it (pytest's captured stdout is not a terminal)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    render({"checks": [{"name": "data", "status": "broken", "detail": LONG_PATH, "fix": FIX}]})
    text = capsys.readouterr().out
    assert "…" not in text and LONG_PATH in text and FIX in text


def test_columns_and_a_terminal_keep_their_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console(file=io.StringIO()).width == 100
    monkeypatch.delenv("COLUMNS")
    assert make_console(file=io.StringIO()).width == UNCUT_WIDTH

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("os.get_terminal_size", lambda fd=0: __import__("os").terminal_size((90, 30)))
    assert make_console(file=Terminal()).width == 90


def test_every_console_is_built_in_one_place():
    """A console built elsewhere (rich.console.Console()) would cut tables again in a log."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    built = [
        f"{path.relative_to(repo)}:{i}"
        for package in ("dataset_tools", "deit3_fast", "pipelines")
        for path in sorted((repo / package).rglob("*.py"))
        if path.name != "console.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "Console(" in line
    ]
    assert built == []
