"""The grid file: parse it, expand variants x axes, resolve and validate every variant's config before anything runs.
The format and the naming rules: deit3_fast/ablate/__init__.py."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import CONFIG_DIR, Config, ConfigError, apply_override, load_config, resolve_path
from ..schema import closest

ABLATIONS_DIR = CONFIG_DIR / "ablations"
GRID_KEYS = ("base", "sets", "variants", "axes")
VARIANT_KEYS = ("name", "cfg", "sets")


@dataclass
class Variant:
    name: str
    cfg: str  # config name or path it starts from
    sets: list[str]  # every override, in order, as `key=value` for load_config / the job
    shown: list[str]  # what sets it apart besides its config (its own sets, axes, derived warm-up)
    config: Config = field(repr=False)


@dataclass
class Grid:
    name: str
    path: Path
    base: str | None
    common: list[str]
    variants: list[Variant]


def _error(message: str) -> Exception:
    return ConfigError(message)


def resolve_grid(name_or_path: str) -> Path:
    return resolve_path(name_or_path, ABLATIONS_DIR, what="grid")


def _assignment(key: str, value, where: str) -> str:
    # JSON is valid YAML, so load_config reads back exactly this value (a string stays a string, a list a list).
    try:
        return f"{key}={json.dumps(value, allow_nan=False)}"
    except (TypeError, ValueError):  # YAML reads an unquoted 2024-01-01 as a date (and .nan as NaN): no config value
        raise _error(f"{where}: {key}: {value!r:.80} is not a config value; quote it if it is meant as text") from None


def _sets(value, where: str) -> list[str]:
    """A mapping {key: value} or a list of `key=value` strings, as `key=value` strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [_assignment(str(k), v, where) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(s, str) and "=" in s for s in value):
        return list(value)
    raise _error(f"{where}: expected a mapping of config keys to values or a list of key=value, got {value!r:.80}")


def _key(assignment: str) -> str:
    return assignment.split("=", 1)[0].strip()


def format_assignment(assignment: str) -> str:
    """`key=value` as tables show it: the value as YAML reads it, a string unquoted."""
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    return f"{key.strip()}={value if isinstance(value, str) else json.dumps(value)}"


def _name_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_name_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-") or "empty"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _scaled_warmup(cfg: str, sets: list[str]) -> list[str]:
    """`schedule.warmup_epochs=W` that keeps warm-up proportional when the overrides change the epoch budget, and
    the same for a progressive-resolution ramp's epochs (so a shorter budget still reaches the final size)."""
    keys = {_key(s) for s in sets}
    if "schedule.epochs" not in keys:
        return []
    # The base's schedule, without the overrides' ramp: a ramp set with the budget may not fit the base's epochs, and
    # a ramp given is not scaled.
    ref = load_config(
        cfg, [s for s in sets if _key(s) != "schedule.epochs" and not _key(s).startswith("schedule.resolution")]
    ).schedule
    tree: dict = {}
    for s in sets:  # the budget asked for, read without validating the rest (a ramp may not fit it unscaled)
        if _key(s) == "schedule.epochs":
            apply_override(tree, s)
    epochs = tree["schedule"]["epochs"]
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        return []  # load_config reports the bad value with the variant's name
    if epochs == ref.epochs:
        return []
    out = []
    if ref.warmup_epochs and "schedule.warmup_epochs" not in keys:
        out.append(f"schedule.warmup_epochs={max(1, _round_half_up(ref.warmup_epochs * epochs / ref.epochs))}")
    r = ref.resolution
    if r.start is not None and not keys & {
        "schedule.resolution.start_epoch",
        "schedule.resolution.end_epoch",
        "schedule.resolution",
    }:
        # The ramp must end before the last epoch, or a short budget never trains at the final size.
        end = max(1, min(_round_half_up(r.end_epoch * epochs / ref.epochs), epochs - 1))
        start = min(_round_half_up(r.start_epoch * epochs / ref.epochs), end - 1)
        out += [f"schedule.resolution.start_epoch={start}", f"schedule.resolution.end_epoch={end}"]
    return out


def _variant_entries(raw, where: str) -> list[tuple[str, str | None, list[str]]]:
    if raw is None:
        return [("", None, [])]
    if not isinstance(raw, list) or not raw:
        raise _error(f"{where}: 'variants' must be a non-empty list of {{name, cfg, sets}}")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _error(f"{where}: variants[{i}] needs a 'name' (a string), got {entry!r:.80}")
        for k in entry:
            if k not in VARIANT_KEYS:
                raise _error(f"{where}: variant '{entry['name']}': unknown key '{k}'" + closest(str(k), VARIANT_KEYS))
        cfg = entry.get("cfg")
        if cfg is not None and not isinstance(cfg, str):
            raise _error(f"{where}: variant '{entry['name']}': 'cfg' must be a config name or path")
        out.append((entry["name"], cfg, _sets(entry.get("sets"), f"{where}: variant '{entry['name']}': sets")))
    return out


def _axis_points(raw, where: str) -> list[list[tuple[str, str, object]]]:
    """Each point of the product: [(key, name part, value), ...]."""
    if raw is None:
        return [[]]
    if not isinstance(raw, dict) or not raw:
        raise _error(f"{where}: 'axes' must be a mapping of config keys to lists of values")
    for key, values in raw.items():
        if not isinstance(key, str) or not key:
            raise _error(f"{where}: axis {key!r} is not a config key")
        if not isinstance(values, list) or not values:
            raise _error(f"{where}: axis '{key}' must be a non-empty list of values, got {values!r:.80}")
    last = [k.rsplit(".", 1)[-1] for k in raw]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(raw, last)}
    return [[(k, short[k], v) for k, v in zip(raw, point)] for point in itertools.product(*raw.values())]


def load_grid(name_or_path: str, extra_sets: list[str] | tuple = ()) -> Grid:
    """Parse, expand and validate a grid; every variant's config is resolved here, before anything runs."""
    path = resolve_grid(name_or_path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise _error(f"{where}: cannot read the grid ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise _error(f"{where}: a grid is a mapping with keys {', '.join(GRID_KEYS)}")
    for k in raw:
        if k not in GRID_KEYS:
            raise _error(f"{where}: unknown grid key '{k}'" + closest(str(k), GRID_KEYS))
    if "variants" not in raw and "axes" not in raw:
        raise _error(f"{where}: a grid needs 'variants', 'axes' or both")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise _error(f"{where}: 'base' must be a config name or path, got {base!r:.80}")
    common = _sets(raw.get("sets"), f"{where}: sets") + list(extra_sets)
    variants, seen = [], set()
    for (vname, vcfg, vsets), point in itertools.product(
        _variant_entries(raw.get("variants"), where), _axis_points(raw.get("axes"), where)
    ):
        name = ",".join([vname] * bool(vname) + [f"{short}={_name_value(v)}" for _, short, v in point])
        if not re.fullmatch(r"[A-Za-z0-9_+=,.@-]+", name) or name.startswith("."):
            raise _error(
                f"{where}: variant name '{name}' is not usable as a folder name (letters, digits and _ + = , . @ - "
                "only)"
            )
        if name in seen:
            raise _error(f"{where}: two variants are called '{name}'")
        seen.add(name)
        cfg = vcfg or base
        if cfg is None:
            raise _error(f"{where}: variant '{name}' has no config: set 'base' or the variant's 'cfg'")
        own = vsets + [_assignment(k, v, f"{where}: axis") for k, _, v in point]
        try:
            derived = _scaled_warmup(cfg, common + own)
            config = load_config(cfg, common + own + derived)
        except ConfigError as e:
            # One variant that cannot run this way (a ramp that no longer fits a budget cut by --set) stops the
            # whole grid before anything runs: say how to go on without it.
            raise ConfigError(
                f"{where}: variant '{name}': {e}. To run the others without it, drop its entry under 'variants' "
                "(or its value from the axis) in a copy of the grid, or change the --set that breaks it"
            ) from None
        shown = [format_assignment(s) for s in own] + [f"{format_assignment(s)} (scaled)" for s in derived]
        variants.append(Variant(name, cfg, common + own + derived, shown, config))
    return Grid(path.stem, path, base, common, variants)
