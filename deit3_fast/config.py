"""The config tree: one validated object, loaded from YAML (+ `--set a.b=value` overrides), passed down as plain values.

Sections: `model`, `data`, `aug` (the data path's own dataclasses, see pipelines/config.py), `optim` (optim.py),
`schedule` (schedule.py), `train`, and `loss` (its names in losses.py). A section lives beside the component it
configures, with its names, the checks of its keys (declared as in schema.py) and its `build`; this module composes
them, reads YAML and `--set`, and checks what no single section can. An unknown key, a value of the wrong type or out
of range, and a combination that cannot run (an image smaller than one patch) is a `ConfigError` naming it (with the
closest valid key or value); recipes in `configs/` are found by name from any directory. No torch here, nor in the
sections' modules at import: every command can load and check a config at once.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.config import CROPS, AugConfig, DataConfig
from pipelines.cores import AUTO
from pipelines.registry import ENGINES

from .amp import AMP_CHOICES
from .archs import ModelConfig, default_img_size, patch_size
from .losses import LOSSES
from .optim import OptimConfig
from .schedule import ResolutionConfig, ScheduleConfig
from .schema import ConfigError, at_least_one, check_value, closest, one_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Also what the other modules and the tests import from here: ConfigError (schema.py) and the composed sections.
__all__ = [
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "AugConfig",
    "OptimConfig",
    "ScheduleConfig",
    "ResolutionConfig",
    "TrainConfig",
    "EvalSet",
    "parse_sets",
    "load_config",
    "config_warnings",
]


@dataclass
class TrainConfig:
    global_batch: int = at_least_one(2048)  # = data.batch_size x world size x accumulation steps
    amp: str = one_of("auto", AMP_CHOICES)  # auto: bf16 where native, else fp16 + GradScaler | bf16 | fp16 | fp32
    compile: bool = False
    channels_last: bool = True
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = at_least_one(50)
    extra_val: list[str] = field(default_factory=list)  # NAME=PATH sets also evaluated (v2, a, r, ...)
    extra_val_every: int = 0  # epochs between their evaluations; 0: the last epoch only
    reference: str = "auto"  # official curve to compare with: auto (the recipe this run follows) | NAME | none
    reference_tolerance: float = 2.0  # warn once when this many points behind at two official epochs in a row
    tensorboard: bool = False  # TensorBoard event files in RUN_DIR/tensorboard (needs the tensorboard package)
    wandb_project: str | None = None  # log to Weights & Biases under this project (needs wandb)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: str = one_of("bce", LOSSES)  # bce: BCE on binarised mixed targets | ce: soft-target cross-entropy


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: str


def parse_sets(specs: list[str]) -> list[EvalSet]:
    """NAME=PATH strings (the command line's --val, the config's train.extra_val) as sets; names are unique. Here,
    with the train section, so that a typo fails at load, not after the first epoch; evalsets.py scores them."""
    sets: list = []
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        name = name.strip().lower()
        if not sep or not name or not path or not re.fullmatch(r"[a-z0-9_-]+", name):
            raise ConfigError(
                f"validation set {spec!r}: expected NAME=PATH with NAME of letters, digits, - or _ "
                "(in1k, v2, a, r, ...)"
            )
        if name in (s.name for s in sets):
            raise ConfigError(f"validation set {name!r} is given twice")
        sets.append(EvalSet(name, path.strip()))
    return sets


# The data path's sections are pipelines' own plain dataclasses (it knows nothing of this schema): their keys'
# checks are declared here. The other sections declare theirs on their fields (schema.py).
_CHOICES = {"data.engine": ENGINES, "aug.crop": CROPS}
_POSITIVE = {"data.batch_size", "aug.img_size"}  # 0 would be a ZeroDivisionError, or a loader that hangs


def _workers(value, where: str) -> None:
    if value != AUTO and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{where}: a count of CPU workers (0 or more) or {AUTO}, got {value!r}")


_CHECKS = {"data.workers": _workers}


def _coerce(value, tp, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:
            try:
                return _coerce(value, tp_, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")

        def key(k):  # JSON (an ablation grid's axis) and dotted --set keys arrive as text: "96" is 96
            return int(k) if args[0] is int and isinstance(k, str) and k.strip().isdigit() else k

        return {
            _coerce(key(k), args[0], f"{where} key"): _coerce(v, args[1], f"{where}[{k}]") for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:  # YAML keys can be numbers or null
            raise ConfigError(f"unknown config key '{where}'" + closest(str(key), names))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, where + ".")
        else:
            declared = fields[key].metadata or {
                "choices": _CHOICES.get(where),
                "positive": where in _POSITIVE,
                "check": _CHECKS.get(where),
            }
            try:
                kwargs[key] = _coerce(value, tp, where)
            except ConfigError:
                # data.workers' rule says what it takes ("a count of CPU workers or auto"), where the type's
                # message names only a Python type ("expected str" for 2.5 against int | str). Only these rules,
                # written for any YAML value: a list is no key of a choices map
                if where in _CHECKS:
                    _CHECKS[where](value, where)
                raise
            check_value(declared, kwargs[key], where)
    return cls(**kwargs)


def resolve_num_classes(cfg: Config) -> Config:
    """`model.num_classes: auto` made a number: the length of the class list that data.train (else data.val) was
    converted with (a shard set's manifest, or a .beton's report). ImageNet-21k releases differ (fall11: 21,841
    classes, winter21: 19,167), so the IN-21k recipes take it from the data."""
    if cfg.model.num_classes != "auto":
        return cfg
    # Here: the .beton reader imports numpy, which a config that gives its class count never needs.
    from dataset_tools.beton import BetonError
    from dataset_tools.shards import REPORT, classes_of

    path = cfg.data.train or cfg.data.val
    if not path:
        raise ConfigError(
            "model.num_classes: auto needs data.train (or data.val) to count the classes: pass --data-train PATH"
        )
    if not Path(path).exists():  # a recipe's own path on a machine without it: not a report missing
        raise ConfigError(
            f"model.num_classes: auto counts the classes of {path}, which does not exist: write it with "
            f"deit3-convert, or pass --data-train PATH"
        )
    try:
        classes = classes_of(path)
    except BetonError as e:
        raise ConfigError(f"model.num_classes: auto: {e}") from None
    if not classes:
        raise ConfigError(
            f"model.num_classes: auto: {path} has no conversion report ({path}{REPORT}) or manifest "
            "naming its classes; set model.num_classes to a number"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=len(classes)))


def config_warnings(cfg: Config) -> list[str]:
    """What runs but is most likely not what was meant (train prints each as one `warning:` line at start): a head
    far wider than the data's classes, a warm-up that never ends within the run."""
    out = []
    s = cfg.schedule
    if s.warmup_epochs and s.warmup_epochs >= s.epochs:
        out.append(
            f"schedule.warmup_epochs {s.warmup_epochs} >= schedule.epochs {s.epochs}: the learning rate is still "
            f"warming up when the run ends and never reaches optim.lr {cfg.optim.lr:g}; set schedule.warmup_epochs "
            "below schedule.epochs (ablate scales it with the budget: warmup x new epochs / recipe epochs, rounded, at "
            "least 1, when its overrides change schedule.epochs without setting it)"
        )
    path, head = cfg.data.train or cfg.data.val, cfg.model.num_classes
    if path and isinstance(head, int):
        from dataset_tools.shards import classes_of  # numpy: only for a config that names data

        try:
            classes = classes_of(path)
        except Exception:  # an unreadable report: the loader names the problem when it opens the data
            classes = None
        if classes and 2 * len(classes) <= head:
            out.append(
                f"model.num_classes {head}, but {path} has {len(classes)} classes: {head - len(classes)} outputs are "
                "never a target and top-5 is over all of them; set model.num_classes: auto (the data's class count)"
            )
    return out


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists): what goes to config.yaml and --dry-run's JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def resolve_path(name_or_path: str, folder: Path = CONFIG_DIR, what: str = "config") -> Path:
    """A path as given, else `folder/NAME` with or without `.yaml`, searched recursively (recipes in configs/,
    grids in configs/ablations/)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    hits = sorted(folder.rglob(stem)) if folder.is_dir() else []
    if hits:
        return hits[0]
    known = sorted(q.stem for q in folder.rglob("*.yaml")) if folder.is_dir() else []
    hint = closest(Path(stem).stem, known) if known else ""
    raise ConfigError(f"{what} '{name_or_path}' not found (not a file, not in {folder}){hint}")


def _no_equals(key: str, then: str | None = None) -> str:
    """What is wrong with a --set of `key` without its `=` (followed on the command line by `then`)."""
    if then is None:
        return f"--set takes KEY=VALUE (got {key!r}): write --set {key}=VALUE"
    return f"--set takes KEY=VALUE (got {key!r} then {then!r}): write --set {key}={then}"


def check_set_syntax(argv: list[str]) -> None:
    """`--set KEY VALUE`, a space where the `=` goes, named with its fix. Left to argparse, VALUE is 'unrecognized
    arguments' (or, for eval, taken as its RUN_DIR) and the error names neither --set nor the `=`."""
    for i, token in enumerate(argv):
        if token == "--":  # what follows is positional
            return
        if token == "--set" and i + 1 < len(argv):
            value, rest = argv[i + 1], argv[i + 2 :]
        elif token.startswith("--set="):
            value, rest = token.removeprefix("--set="), argv[i + 1 :]
        else:
            continue
        if "=" in value:
            continue
        raise ConfigError(_no_equals(value, rest[0] if rest and not rest[0].startswith("--") else None))


def apply_override(tree: dict, assignment: str) -> None:
    """`a.b=value` into a nested dict; the value is parsed as YAML (numbers, lists, true/false, null)."""
    if "=" not in assignment:
        raise ConfigError(_no_equals(assignment))
    key, raw = assignment.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


# Keys that may differ between a run dir's config and the current one without changing what is computed: where the
# data lives, how many decode threads, how often the loss is logged.
NO_EFFECT_KEYS = frozenset(
    {
        "data.train",
        "data.val",
        "data.stage_to",
        "data.workers",
        "data.os_cache",
        "train.log_every",
        "train.extra_val",
        "train.extra_val_every",
        "train.reference",
        "train.reference_tolerance",
        "train.tensorboard",
        "train.wandb_project",
    }
)


# The keys that name a file or folder (and train.extra_val's NAME=PATH entries). A run records them absolute
# (`absolute_paths`), so it resumes and evaluates from any working directory.
PATH_KEYS = ("data.train", "data.val", "data.stage_to", "model.checkpoint")


def absolute_paths(tree: dict) -> tuple[dict, dict[str, str]]:
    """A config dict (as `to_dict` gives it) with its relative paths made absolute against the working directory,
    and the ones it changed as they were given ({dotted key: path}). A URL (`scheme://...`) is left as it is."""

    def absolute(path: str) -> str:
        return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)

    tree, given = copy.deepcopy(tree), {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str) and absolute(node[name]) != node[name]:
            given[key], node[name] = node[name], absolute(node[name])
    train = tree.get("train")
    if isinstance(train, dict) and isinstance(train.get("extra_val"), list):
        for i, spec in enumerate(train["extra_val"]):
            name, sep, path = str(spec).partition("=")
            if sep and path.strip() and absolute(path.strip()) != path.strip():
                given[f"train.extra_val[{i}]"] = str(spec)
                train["extra_val"][i] = f"{name}={absolute(path.strip())}"
    return tree, given


def with_absolute_paths(cfg: Config) -> tuple[Config, dict[str, str]]:
    """`absolute_paths` of a Config."""
    tree, given = absolute_paths(to_dict(cfg))
    return (_build(Config, tree), given) if given else (cfg, given)


def with_defaults(tree: dict) -> dict:
    """A config dict as an earlier version wrote it (a checkpoint's, a run dir's config.yaml), with the keys added
    since filled in at their defaults. A new key's default is the behaviour from before it existed, so a run started
    then still compares equal to the same config now, and resumes without --force."""

    def fill(default, given):
        if not isinstance(default, dict) or not isinstance(given, dict) or not default:
            return given
        return {**default, **{k: fill(default.get(k), v) for k, v in given.items()}}

    return fill(to_dict(Config()), tree)


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (as `to_dict` gives them)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> Config:
    """A recipe (by name or path) with `overrides` applied; `base`, a config dict a run recorded (its checkpoint's or
    config.yaml), stands in for a recipe where none is named."""
    tree: dict = copy.deepcopy(with_defaults(base)) if base is not None and not name_or_path else {}
    if name_or_path:
        path = resolve_path(name_or_path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, ...), got {tree!r:.80}")
    for assignment in overrides:
        apply_override(tree, assignment)
    cfg = _build(Config, tree)
    if not isinstance(tree.get("aug"), dict) or "img_size" not in tree["aug"]:
        # Unset: the resolution the model's name carries (deit3_base_patch16_384 -> 384), else 224.
        cfg.aug.img_size = default_img_size(cfg.model.name)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """What no single key says wrong but the combination cannot run. Like the official code and timm, the patch
    grid is floored (ViT-H/14 at 160 px sees 11 x 11 patches): any size of at least one patch works."""
    patch = patch_size(cfg.model.name)
    if cfg.aug.img_size < patch:
        raise ConfigError(f"aug.img_size {cfg.aug.img_size} is smaller than {cfg.model.name}'s patch size {patch}")
    if cfg.train.extra_val_every < 0:
        raise ConfigError(
            f"train.extra_val_every: must be >= 0 (0: the last epoch only), got {cfg.train.extra_val_every}"
        )
    _check_randaugment(cfg.aug.auto_augment)
    cfg.schedule.resolution.check(cfg.aug.img_size, patch, cfg.model.name, cfg.schedule.epochs)
    parse_sets(cfg.train.extra_val)  # NAME=PATH, names unique: a typo fails at load, not after the first epoch


_RA_SECTIONS = ("mstd", "mmax", "inc", "m", "n", "p")  # timm's rand_augment_transform options (t: a transform set)


def _check_randaugment(policy: str | None) -> None:
    """aug.auto_augment at load, without timm: a `rand-...` policy whose sections timm knows (BatchAugment runs
    timm's RandAugment; the ops themselves are checked when it is built)."""
    if not policy:
        return
    sections = policy.split("-")
    bad = [
        c
        for c in sections[1:]
        if not c.startswith("t")
        and not any(c.startswith(k) and c[len(k) :].replace(".", "", 1).isdigit() for k in _RA_SECTIONS)
    ]
    if sections[0] != "rand" or bad:
        what = f"unknown section {bad[0]!r}" if sections[0] == "rand" else "not a RandAugment policy"
        raise ConfigError(
            f"aug.auto_augment {policy!r}: {what}; timm's RandAugment policies are written like "
            "rand-m9-mstd0.5-inc1 (m magnitude, n ops per image, p probability, mstd magnitude noise, "
            "mmax magnitude cap, inc increasing ops)"
        )
