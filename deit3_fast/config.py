"""The config tree: one validated object, loaded from YAML (+ `--set a.b=value` overrides), passed down as plain values.

Sections: `model`, `data`, `aug` (the data path's own dataclasses, see pipelines/config.py), `optim`, `schedule`,
`train`, and `loss`. An unknown key, a value of the wrong type or out of range, and a combination that cannot run
(an image smaller than one patch) is a `ConfigError` naming it (with the closest valid key or value); recipes in
`configs/` are found by name from any directory. No torch here: every command can load and check a config at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dataset_tools.errors import UserError

from pipelines.config import CROPS, ENGINES, AugConfig, DataConfig

from .archs import MODEL_NAMES, default_img_size, patch_size

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A config (a recipe, an --set, an --overrides file) that cannot be run as written."""


@dataclass
class ModelConfig:
    name: str = "deit3_small"       # deit3_{small,...,huge}, timm's deit3_*_patch*_RES or official deit_*_LS names
    num_classes: int | str = 1000   # or auto: the class count of data.train's manifest or conversion report
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
class ResolutionConfig:
    """Progressive resolution (FFCV's low-res-first schedules): the training crop size moves linearly from `start`
    at `start_epoch` to `end` at `end_epoch`, in multiples of `step`; evaluation stays at aug.img_size."""
    start: int | None = None        # null: no ramp, aug.img_size throughout
    end: int | None = None          # null: aug.img_size
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 32                  # sizes are multiples of it: a small fixed set (torch.compile compiles each once)
    # Per-process batch at a training size, e.g. {128: 256, 160: 128}; sizes not named use data.batch_size. The
    # global batch stays train.global_batch: accumulation steps make up the difference, so the optimiser steps and
    # the learning-rate schedule are those of a fixed-batch run (larger batches where small crops leave memory).
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)


@dataclass
class TrainConfig:
    global_batch: int = 2048        # = data.batch_size x world size x accumulation steps
    amp: str = "auto"               # auto: bf16 where native, else fp16 + GradScaler | bf16 | fp16 | fp32
    compile: bool = False
    channels_last: bool = True
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 50
    extra_val: list[str] = field(default_factory=list)  # NAME=PATH sets also evaluated (v2, a, r, ...)
    extra_val_every: int = 0        # epochs between their evaluations; 0: the last epoch only
    reference: str = "auto"         # official curve to compare with: auto (the recipe this run follows) | NAME | none
    reference_tolerance: float = 2.0  # warn once when this many points behind at two official epochs in a row
    tensorboard: bool = False       # TensorBoard event files in RUN_DIR/tensorboard (needs the tensorboard package)
    wandb_project: str | None = None  # log to Weights & Biases under this project (needs wandb)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: str = "bce"               # bce: BCE on binarised mixed targets | ce: soft-target cross-entropy


# The vocabulary of this schema's own keys, imported by the modules that act on them (optim.py, losses.py, device.py).
OPTIMIZERS = ("lamb", "adamw")
LOSSES = ("bce", "ce")
AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
_CHOICES = {"data.engine": ENGINES, "aug.crop": CROPS, "loss": LOSSES, "train.amp": AMP_CHOICES,
            "optim.name": OPTIMIZERS, "model.name": MODEL_NAMES}
# Sizes and counts a run divides by or loops over: 0 would be a ZeroDivisionError, or a loader that hangs.
_POSITIVE = {"data.batch_size", "train.global_batch", "train.log_every", "aug.img_size", "model.num_classes",
             "schedule.epochs"}


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


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
        return {_coerce(key(k), args[0], f"{where} key"): _coerce(v, args[1], f"{where}[{k}]")
                for k, v in value.items()}
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
            if where == "model.num_classes" and isinstance(kwargs[key], str) and kwargs[key] != "auto":
                raise ConfigError(f"{where}: a class count or auto, got {kwargs[key]!r}")
            if where in _POSITIVE and isinstance(kwargs[key], int) and kwargs[key] < 1:
                raise ConfigError(f"{where}: must be at least 1, got {kwargs[key]!r}")
    return cls(**kwargs)


def resolve_num_classes(cfg: Config) -> Config:
    """`model.num_classes: auto` made a number: the length of the class list that data.train (else data.val) was
    converted with (a shard set's manifest, or a .beton's report). ImageNet-21k releases differ (fall11: 21,841
    classes, winter21: 19,167), so the IN-21k recipes take it from the data."""
    if cfg.model.num_classes != "auto":
        return cfg
    from dataset_tools.beton import BetonError
    from dataset_tools.shards import classes_of

    path = cfg.data.train or cfg.data.val
    if not path:
        raise ConfigError("model.num_classes: auto needs data.train (or data.val) to count the classes")
    try:
        classes = classes_of(path)
    except BetonError as e:
        raise ConfigError(f"model.num_classes: auto: {e}") from None
    if not classes:
        raise ConfigError(f"model.num_classes: auto: {path} has no conversion report ({path}.json) or manifest "
                          "naming its classes; set model.num_classes to a number")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=len(classes)))


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
    hint = _closest(Path(stem).stem, known) if known else ""
    raise ConfigError(f"{what} '{name_or_path}' not found (not a file, not in {folder}){hint}")


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
NO_EFFECT_KEYS = frozenset({"data.train", "data.val", "data.stage_to", "data.workers", "data.os_cache",
                            "train.log_every", "train.extra_val", "train.extra_val_every", "train.reference",
                            "train.reference_tolerance", "train.tensorboard", "train.wandb_project"})


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
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """What no single key says wrong but the combination cannot run. Like the official code and timm, the patch
    grid is floored (ViT-H/14 at 160 px sees 11 x 11 patches): any size of at least one patch works."""
    patch = patch_size(cfg.model.name)
    if cfg.aug.img_size < patch:
        raise ConfigError(f"aug.img_size {cfg.aug.img_size} is smaller than {cfg.model.name}'s patch size {patch}")
    if cfg.train.extra_val_every < 0:
        raise ConfigError(f"train.extra_val_every: must be >= 0 (0: the last epoch only), got "
                          f"{cfg.train.extra_val_every}")
    _check_randaugment(cfg.aug.auto_augment)
    _check_resolution(cfg.schedule.resolution, cfg.aug.img_size, patch, cfg.model.name, cfg.schedule.epochs)
    from .evalsets import parse_sets

    parse_sets(cfg.train.extra_val)  # NAME=PATH, names unique: a typo fails at load, not after the first epoch


def _check_resolution(r: ResolutionConfig, img_size: int, patch: int, model: str, epochs: int) -> None:
    if r.start is None:
        if r.batch_sizes:
            raise ConfigError("schedule.resolution.batch_sizes: a batch per training size needs a ramp "
                              "(schedule.resolution.start); without one, set data.batch_size")
        return
    end = r.end if r.end is not None else img_size
    where = "schedule.resolution"
    if r.step < 1:
        raise ConfigError(f"{where}.step: must be at least 1, got {r.step} (the sizes are multiples of it)")
    if r.start % r.step or end % r.step:
        raise ConfigError(f"{where}: start {r.start} and end {end} (null: aug.img_size) must be multiples of step "
                          f"{r.step}, so that the sizes are a small fixed set")
    if r.start < patch or r.start > end:
        raise ConfigError(f"{where}: start {r.start} must be at least {model}'s patch size {patch} and at most end "
                          f"{end}")
    if not 0 <= r.start_epoch < r.end_epoch:
        raise ConfigError(f"{where}: the ramp needs 0 <= start_epoch < end_epoch, got {r.start_epoch} and "
                          f"{r.end_epoch}")
    if r.end_epoch >= epochs:
        raise ConfigError(f"{where}: end_epoch {r.end_epoch} must be below schedule.epochs {epochs}, or the run "
                          f"never trains at the final size {end}")
    sizes = range(r.start, end + 1, r.step)  # a short budget may skip some of them (ablate scales the ramp)
    for size, batch in r.batch_sizes.items():
        if size not in sizes:
            raise ConfigError(f"{where}.batch_sizes: the ramp never trains at {size} px; its sizes are "
                              f"{', '.join(map(str, sizes))}")
        if batch < 1:
            raise ConfigError(f"{where}.batch_sizes[{size}]: must be at least 1, got {batch}")


_RA_SECTIONS = ("mstd", "mmax", "inc", "m", "n", "p")  # timm's rand_augment_transform options (t: a transform set)


def _check_randaugment(policy: str | None) -> None:
    """aug.auto_augment at load, without timm: a `rand-...` policy whose sections timm knows (the device stage runs
    timm's RandAugment; the ops themselves are checked when it is built)."""
    if not policy:
        return
    sections = policy.split("-")
    bad = [c for c in sections[1:] if not c.startswith("t")
           and not any(c.startswith(k) and c[len(k):].replace(".", "", 1).isdigit() for k in _RA_SECTIONS)]
    if sections[0] != "rand" or bad:
        what = f"unknown section {bad[0]!r}" if sections[0] == "rand" else "not a RandAugment policy"
        raise ConfigError(f"aug.auto_augment {policy!r}: {what}; timm's RandAugment policies are written like "
                          "rand-m9-mstd0.5-inc1 (m magnitude, n ops per image, p probability, mstd magnitude noise, "
                          "mmax magnitude cap, inc increasing ops)")
