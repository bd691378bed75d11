"""The config tree: one validated object, loaded from YAML (+ `--set a.b=value` overrides), passed down as plain values.

Sections: `model`, `data`, `aug` (the data path's own dataclasses, see pipelines/config.py), `optim`, `schedule`,
`train`, and `loss`. An unknown key or a value of the wrong type is a `ConfigError` naming it (with the closest valid
key); recipes in `configs/` are found by name from any directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.config import CROPS, ENGINES, AugConfig, DataConfig

from .models import MODEL_NAMES, default_img_size

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(Exception):
    pass


@dataclass
class ModelConfig:
    name: str = "deit3_small"       # deit3_{small,...,huge}, timm's deit3_*_patch*_RES or official deit_*_LS names
    num_classes: int = 1000
    drop_path: float = 0.05         # the same rate in every block (official), not timm's linear ramp
    layer_scale_init: float | None = 1e-4  # null: no LayerScale (plain pre-norm residual blocks)
    checkpoint: str | None = None   # weights to start from (fine-tuning)


@dataclass
class OptimConfig:
    name: str = "lamb"              # lamb (pre-training) | adamw (fine-tuning)
    lr: float = 4e-3                # used as-is (the recipes' --unscale-lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0      # LAMB's built-in global clipping


@dataclass
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    global_batch: int = 2048        # = data.batch_size x world size x accumulation steps
    amp: str = "auto"               # auto: bf16 where native, else fp16 + GradScaler | bf16 | fp16 | fp32
    compile: bool = False
    channels_last: bool = True
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 50


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: str = "bce"               # bce: BCE on binarised mixed targets | ce: soft-target cross-entropy


AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
_CHOICES = {"data.engine": ENGINES, "aug.crop": CROPS, "loss": ("bce", "ce"), "train.amp": AMP_CHOICES,
            "optim.name": ("lamb", "adamw"), "model.name": MODEL_NAMES}
# Sizes and counts a run divides by or loops over: 0 would be a ZeroDivisionError, or a loader that hangs.
_POSITIVE = {"data.batch_size", "train.global_batch", "train.log_every", "aug.img_size", "model.num_classes"}


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


def _coerce(value, tp, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
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
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:  # YAML keys can be numbers or null
            raise ConfigError(f"unknown config key '{where}'" + _closest(str(key), names))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, where + ".")
        else:
            kwargs[key] = _coerce(value, tp, where)
            if where in _CHOICES and kwargs[key] not in _CHOICES[where]:
                raise ConfigError(f"{where}: {kwargs[key]!r} is not one of {', '.join(_CHOICES[where])}")
            if where in _POSITIVE and kwargs[key] is not None and kwargs[key] < 1:
                raise ConfigError(f"{where}: must be at least 1, got {kwargs[key]!r}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists): what goes to config.yaml and --dry-run's JSON."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def resolve_path(name_or_path: str) -> Path:
    """A path as given, else `configs/NAME` with or without `.yaml`, searched recursively."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    hits = sorted(CONFIG_DIR.rglob(stem)) if CONFIG_DIR.is_dir() else []
    if hits:
        return hits[0]
    known = sorted(q.stem for q in CONFIG_DIR.rglob("*.yaml")) if CONFIG_DIR.is_dir() else []
    hint = _closest(Path(stem).stem, known) if known else ""
    raise ConfigError(f"config '{name_or_path}' not found (not a file, not in {CONFIG_DIR}){hint}")


def apply_override(tree: dict, assignment: str) -> None:
    """`a.b=value` into a nested dict; the value is parsed as YAML (numbers, lists, true/false, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
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
NO_EFFECT_KEYS = frozenset({"data.train", "data.val", "data.workers", "data.os_cache", "train.log_every"})


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (as `to_dict` gives them)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    tree: dict = {}
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
    return cfg
