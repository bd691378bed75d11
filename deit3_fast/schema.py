"""How a config section declares the checks on its keys, so that each section (beside its component: optim.py,
schedule.py, ...) owns its names and its validation, and config.py only composes the sections and loads YAML.

A key's checks ride on its dataclass field: `one_of(default, NAMES)` (the value must be one of them),
`at_least_one(default)` (a size or count the run divides by or loops over: 0 would be a ZeroDivisionError or a
loader that hangs), `checked(default, fn)` (any other rule: `fn(value, where)` raises a ConfigError). The loader
(config._build) applies them to each key given, as it reads it. No torch here, nor in a section's module at import:
every command loads and checks its config before torch starts.
"""

from __future__ import annotations

import difflib
from dataclasses import field

from dataset_tools.errors import UserError


class ConfigError(UserError):
    """A config (a recipe, an --set, an --overrides file) that cannot be run as written."""


def closest(key: str, options) -> str:
    """The hint an error about `key` ends with: the closest of `options`, else all of them."""
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


def one_of(default, options: tuple[str, ...]):
    """A key whose value is one of `options` (the component's own tuple of names)."""
    return field(default=default, metadata={"choices": options})


def at_least_one(default):
    return field(default=default, metadata={"positive": True})


def checked(default, check, *, positive: bool = False):
    """A key with its own rule: `check(value, where)` raises a ConfigError naming `where` (the dotted key)."""
    return field(default=default, metadata={"check": check, "positive": positive})


def check_value(metadata, value, where: str) -> None:
    """A field's declared checks on a value read for it (in this order: choices, own rule, at least one)."""
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    if metadata.get("check"):
        metadata["check"](value, where)
    if metadata.get("positive") and isinstance(value, int) and value < 1:
        raise ConfigError(f"{where}: must be at least 1, got {value!r}")
