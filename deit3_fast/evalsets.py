"""Evaluation as the paper reports it: named validation sets, each scored the way it must be.

* `in1k`, `v2` and any other name: top-1 / top-5 over all classes. ImageNet-V2's folders are class indices
  (`deit3-convert --folder-labels index`), not names.
* `a` / `imagenet-a` and `r` / `imagenet-r`: 200-class sets. The logits of the other 800 classes are masked out
  before top-k (`configs/reference/imagenet_{a,r}_wnids.txt`, mapped to label indices through the set's class list);
  with all 1000 logits such a set scores near zero.
* ReaL (`--real real.json`): the IN-1k validation predictions scored against the reassessed labels, looked up by
  each sample's source file name (`ILSVRC2012_val_{i+1:08d}.JPEG` is entry i; an empty entry is not counted).

A set is given as NAME=PATH (a .beton or shard folder converted with the training split's class list; the config's
`parse_sets` reads the lists, so a typo fails at load). The loop that scores a loader is eval_loop.py, which the
trainer's evaluation runs too.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from rich.table import Table

from dataset_tools.atomic import write_text_atomic
from dataset_tools.beton import BetonError
from dataset_tools.console import make_console
from dataset_tools.shards import classes_of, source_names
from pipelines import DataError

from .checkpoint import load_weights
from .config import CONFIG_DIR, Config, ConfigError, EvalSet, parse_sets
from .device import resolve_amp
from .eval_loop import evaluate
from .loaders import make_loader
from .models import build_model, load_checkpoint

# EvalSet and parse_sets are the config's (it checks train.extra_val at load); the eval command takes them from here.
__all__ = [
    "EvalSet",
    "parse_sets",
    "class_mask",
    "real_set",
    "evaluate_checkpoint",
    "real_top1",
    "load_real",
    "save_predictions",
    "prediction_row",
    "render",
]

SUBSETS = {
    "a": "imagenet_a_wnids.txt",
    "imagenet-a": "imagenet_a_wnids.txt",
    "r": "imagenet_r_wnids.txt",
    "imagenet-r": "imagenet_r_wnids.txt",
}
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")


def class_mask(name: str, classes: list[str] | None, num_classes: int):
    """The classes a set is scored over (a bool tensor, one per class), or None for all of them."""
    if name not in SUBSETS:
        return None
    wnids = (CONFIG_DIR / "reference" / SUBSETS[name]).read_text().split()
    if not classes:
        raise ConfigError(
            f"validation set {name!r}: masking to its {len(wnids)} classes needs the class list it "
            "was converted with (its .beton.json report or manifest)"
        )
    if len(classes) != num_classes:  # converted with its own 200 classes: labels are not the model's outputs
        raise ConfigError(
            f"validation set {name!r} was converted with {len(classes)} classes, the model has "
            f"{num_classes}: convert it with --classes TRAIN.beton.json, so its labels are the "
            "model's class indices"
        )
    index = {c: i for i, c in enumerate(classes)}
    missing = [w for w in wnids if w not in index]
    if missing:
        raise ConfigError(
            f"validation set {name!r}: {len(missing)} of its classes (e.g. {missing[0]}) are not in "
            "the class list it was converted with: convert it with --classes TRAIN.beton.json"
        )
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[[index[w] for w in wnids]] = True
    return mask


def real_set(sets: list[EvalSet], real) -> EvalSet | None:
    """The set ReaL labels score (named in1k or val); None without labels. The CLI asks before it sets a device up."""
    if real is None:
        return None
    found = next((s for s in sets if s.name in ("in1k", "val")), None)
    if found is None:
        raise ConfigError(
            "--real scores the ImageNet-1k validation set: name it in1k (--val in1k=PATH) or give --data-val"
        )
    return found


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str,
    sets: list[EvalSet],
    device,
    *,
    ema: bool = False,
    real: list[list[int]] | None = None,
    keep: bool = False,
) -> tuple[dict, list[dict]]:
    """Score `checkpoint` (its EMA weights with `ema`) on each set as that set must be scored: {set name: {acc1,
    acc5, n[, classes]}}, plus "real" when ReaL labels are given (scored on the set named in1k or val), and with
    `keep` one prediction row per image (`prediction_row`)."""
    scored_by_real = real_set(sets, real)
    model = build_model(cfg.model, cfg.aug.img_size, train=False)
    if ema:
        model.load_state_dict(load_weights(checkpoint, ema=True))  # a run's own EMA: its layout, as it is
    else:
        load_checkpoint(model, checkpoint)
    model = model.to(device).to(memory_format=torch.channels_last)
    amp = resolve_amp(cfg.train.amp, device)
    keep = keep or real is not None
    results, predictions = {}, []
    trained_on: list | None = None
    for s in sets:
        try:
            sources = source_names(s.path) if keep else None
            classes = classes_of(s.path)
        except BetonError as e:  # e.g. a folder given where a .beton or a shard set belongs
            raise DataError(f"--val {s.name}: {e}") from None
        if sources is None and s is scored_by_real:
            raise ConfigError(
                f"--real: {s.path} was converted without its list of source files (the .sources.txt "
                "beside it, which ReaL's labels are looked up by): convert it again"
            )
        mask = class_mask(s.name, classes, cfg.model.num_classes)
        ev = evaluate(
            model,
            make_loader(replace(cfg, data=replace(cfg.data, val=s.path)), "val", device, amp=amp),
            amp,
            mask=mask,
            keep=keep,
        )
        results[s.name] = {"acc1": ev["acc1"], "acc5": ev["acc5"], "n": ev["n"]}
        if mask is not None:
            results[s.name]["classes"] = int(mask.sum())
        if s is scored_by_real:
            results["real"] = real_top1(ev["top5"][:, 0], [sources[i] for i in ev["index"]], real)
        if keep:
            if trained_on is None and cfg.data.train:
                trained_on = _classes_or_none(cfg.data.train) or []
            # The set's class list where it is the model's (converted with --classes TRAIN.beton.json), else the
            # training data's: the names of the model's outputs.
            names = next((c for c in (classes, trained_on) if c and len(c) == cfg.model.num_classes), None)
            predictions += [
                prediction_row(s.name, int(i), sources[i] if sources else None, int(y), t, p, names)
                for i, y, t, p in zip(ev["index"], ev["label"], ev["top5"], ev["top5_prob"])
            ]
    return results, predictions


def prediction_row(name: str, index: int, source, label: int, top5, prob, names: list[str] | None) -> dict:
    """One line of --save-predictions: set, sample index, source file, label, the top-5 classes and their softmax
    probabilities, and where the class list is known the label's and the top-5's class names."""
    row = {"set": name, "index": index, "source": source, "label": label, "top5": [int(c) for c in top5]}
    row["top5_prob"] = [round(float(p), 6) for p in prob]
    if names is not None:
        row["label_name"] = names[label] if 0 <= label < len(names) else None
        row["top5_names"] = [names[int(c)] for c in top5]
    return row


def _classes_or_none(path: str) -> list[str] | None:
    try:
        return classes_of(path)
    except (BetonError, OSError):  # the training data need not be here to score a set
        return None


def real_top1(top1, sources: list[str], real: list[list[int]]) -> dict:
    """ReaL top-1 (%) of predictions `top1[i]` for samples whose source files are `sources[i]`."""
    hits = counted = 0
    for pred, src in zip(top1, sources):
        m = _VAL_NAME.search(src)
        if m is None or not 1 <= int(m.group(1)) <= len(real):
            raise ConfigError(
                f"ReaL labels are indexed by ImageNet validation file names "
                f"(ILSVRC2012_val_00000001.JPEG ... {len(real)}), and this set has {src!r}: use "
                "--real with the ImageNet-1k validation set"
            )
        labels = real[int(m.group(1)) - 1]
        if labels:
            counted += 1
            hits += int(pred) in labels
    return {"acc1": 100.0 * hits / max(counted, 1), "n": counted}


def load_real(path: str | Path) -> list[list[int]]:
    try:
        real = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--real {path}: unreadable ({e}); the file is ReaL's real.json (a list of 50,000 lists of labels)"
        ) from None
    if not isinstance(real, list) or not all(isinstance(x, list) for x in real):
        raise ConfigError(f"--real {path}: not ReaL's real.json (a list of lists of label indices)")
    return real


def save_predictions(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per sample (`prediction_row`)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def render(results: dict) -> None:
    """The table `eval` prints (on stderr: stdout is its JSON)."""
    t = Table(title="evaluation", title_justify="left")
    for col in ("set", "images", "top-1", "top-5", "scored over"):
        t.add_column(col, justify="left" if col in ("set", "scored over") else "right")
    for name, r in results.items():
        over = (
            "ReaL labels (images with none left out)"
            if name == "real"
            else (f"{r['classes']} classes" if "classes" in r else "all classes")
        )
        t.add_row(name, f"{r['n']:,}", f"{r['acc1']:.2f}", f"{r['acc5']:.2f}" if "acc5" in r else "—", over)
    make_console(stderr=True).print(t)
