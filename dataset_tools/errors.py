"""The errors a user can fix, for every command of the project: `UserError` is their one base.

It lives in the lowest package (dataset_tools imports nothing of pipelines or deit3_fast, and both import it), so
each package's own errors (`BetonError`, `DataError`, `ConfigError`, ...) derive from it without an import cycle, and
each command line reports them all with one `except UserError`: one line on stderr, the class's exit code. Kept
free of heavy imports: the CLIs report them without loading FFCV or torch.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a path, a setting, a file): printed as one line, `PREFIX: message` (with the
    `hint`, when given, after it), and the command exits with `exit_code`."""

    exit_code = 2
    prefix = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message}: {self.hint}" if self.hint else message


class SourceError(UserError):
    """The source tree, class list or output location cannot be used at all."""


class ConversionError(UserError):
    """The write cannot finish (strict mode hit a bad file, disk full, a worker died); nothing is kept."""


class UsageError(UserError):
    """Command-line arguments that do not fit together or are out of range."""
