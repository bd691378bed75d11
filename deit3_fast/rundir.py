"""The run directory: the files a training run writes, and the one place that reads them back.

    config.yaml         the config (what a resume compares against), its paths absolute; a comment above them says
                        how they were given and where training started
    run.json            what this run resolved it to: AMP dtype, device, world size, per-process batch, accumulation
    metrics.jsonl       one JSON row per finished epoch (`epoch`: 0-based, the data's index; the console, progress
                        bar and messages count from 1: row 0 is "epoch 1/N"), `train_loss`, `lr`, `val_acc1`, ...)
    checkpoint-*.pt     the checkpoints (their format: checkpoint.py)
    curves.png          the curves of metrics.jsonl, redrawn (atomically) after every epoch
    wandb-id.txt        the W&B run id (train.wandb_project): a resume continues that W&B run

`ablate` reads variants' run dirs through the same functions and draws its overlay with the same plot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from dataset_tools.atomic import write_atomic, write_text_atomic

from .config import ConfigError

CONFIG, FACTS, METRICS, CURVES = "config.yaml", "run.json", "metrics.jsonl", "curves.png"
WANDB_ID = "wandb-id.txt"


def write_config(out: Path, config: dict, given: dict[str, str] | None = None) -> None:
    """config.yaml; `given`: the paths `config.absolute_paths` made absolute, as they were given, for the reader."""
    head = ""
    if given:
        head = f"# Paths are absolute. As given, relative to {os.getcwd()} (where training started):\n" + "".join(
            f"#   {key}: {path}\n" for key, path in given.items()
        )
    write_text_atomic(str(out / CONFIG), head + yaml.safe_dump(config, sort_keys=False))


def holds_run(out: Path) -> bool:
    """Whether `out` holds (part of) a run: a checkpoint, or an epoch in metrics.jsonl. Training afresh there would
    overwrite it."""
    return out.is_dir() and (any(out.glob("checkpoint-*.pt")) or bool((out / METRICS).is_file() and read_metrics(out)))


def read_config(out: Path) -> dict | None:
    """The config a run dir was written with, or None when it has none (or an unreadable one)."""
    try:
        tree = yaml.safe_load((out / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return tree if isinstance(tree, dict) else None


def wandb_id(out: Path, resumed: bool) -> str:
    """The W&B run id of this run dir: a resumed run continues the W&B run its dir recorded; a fresh run (also a
    fresh run in a used dir) starts a new one, or W&B would get its steps 1, 2, ... again on the old run."""
    import secrets

    path = out / WANDB_ID
    if resumed and path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    write_text_atomic(str(path), run_id + "\n")
    return run_id


def write_facts(out: Path, facts: dict) -> None:
    write_text_atomic(str(out / FACTS), json.dumps(facts, indent=1) + "\n")


def describe_facts(f: dict) -> str:
    """run.json as the one line the console shows at the start of a run."""
    amp = f["amp"] if f["amp_config"] == f["amp"] else f"{f['amp_config']} -> {f['amp']}"
    line = (
        f"{f['device']} x {f['world_size']}, amp {amp}, global batch {f['global_batch']} = "
        f"{f['per_process_batch']} per process x {f['world_size']} x {f['accumulation_steps']} accumulation"
    )
    by_size = f.get("batch_by_size") or {}  # schedule.resolution.batch_sizes
    for size, b in by_size.items():
        line += f"; at {size} px {b['per_process_batch']} x {f['world_size']} x {b['accumulation_steps']}"
    cpu = f.get("cpu")  # absent from run dirs written before it was recorded
    if cpu:
        auto = " (auto)" if cpu["data_workers_config"] == "auto" else ""
        shared = f" per process ({cpu['processes']} on this node)" if cpu["processes"] > 1 else ""
        line += (
            f"; loader workers {cpu['data_workers']}{auto} + torch threads {cpu['torch_threads']} on {cpu['cores']} "
            f"cores{shared}"
        )
    notes = [f["batch_note"]] + [b["batch_note"] for b in by_size.values()]
    return line + "".join(f"\n{n}" for n in notes if n)


def epoch_line(row: dict, epochs: int, eta_s: float) -> str:
    """A metrics.jsonl row as the one console line per epoch (the file keeps every number)."""
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4f}", f"lr {row['lr']:.2e}"]
    if row.get("train_img_size"):
        parts.append(f"@{row['train_img_size']}px")
    if row.get("val_acc1") is not None:
        parts.append(f"val {row['val_acc1']:.2f}/{row['val_acc5']:.2f}")
    if row.get("gap") is not None:
        parts.append(f"gap {row['gap']:+.2f} (official {row['official_acc1']:.2f})")
    parts += [
        f"{row['img_per_s']:,.0f} img/s",
        f"data wait {100 * row['data_wait_frac']:.0f}%",
        f"mem {row['max_mem_mb']:,.0f} MB",
    ]
    if eta_s > 0:
        d, rest = divmod(int(eta_s), 86400)
        parts.append(
            "ETA "
            + (
                f"{d}d {rest // 3600}h"
                if d
                else f"{rest // 3600}h {rest % 3600 // 60:02d}m"
                if rest >= 3600
                else f"{rest // 60}m {rest % 60:02d}s"
            )
        )
    return "  ".join(parts)


def read_metrics(out: Path) -> list[dict]:
    p = out / METRICS
    if not p.exists():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a row cut short by a crash mid-append: that epoch is redone on resume
                break
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ConfigError(f"{p}: line {i + 1} is not a metrics row (JSON with an epoch); mend or remove it")
        rows.append(row)
    return rows


def append_metrics(out: Path, row: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def start_metrics(out: Path, resumed_after_epoch: int | None) -> None:
    """A fresh run starts an empty metrics.jsonl; a resumed one keeps the rows up to its checkpoint's epoch. A run
    killed between logging an epoch and saving its checkpoint redoes that epoch: its row (and any later one) goes,
    so every epoch is logged once."""
    p = out / METRICS
    if resumed_after_epoch is None:
        p.unlink(missing_ok=True)
        return
    rows = read_metrics(out)
    kept = [r for r in rows if r["epoch"] <= resumed_after_epoch]
    if len(kept) != len(rows):
        write_text_atomic(str(p), "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(
    runs: dict[str, list[dict]],
    png: Path,
    title: str | None = None,
    overlay: bool = False,
    reference: tuple[str, dict[int, float]] | None = None,
) -> bool:
    """One run: validation top-1 and top-5, train loss and the learning rate against epoch. Several runs overlaid
    (`overlay`, as `ablate` draws its variants): top-1 and train loss relative to each run's first epoch, so BCE
    (~0.5) and cross-entropy (~2) curves share one readable axis. `reference` (name, {epoch: top-1}) is drawn dashed
    on the top-1 axis: the official curve of the recipe a run follows. False (and no file) when no run has an
    epoch yet."""
    runs = {name: rows for name, rows in runs.items() if rows}
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = not overlay
    fig, axes = plt.subplots(1, 3 if single else 2, figsize=(13 if single else 12, 4))
    acc, loss = axes[0], axes[1]
    for name, rows in runs.items():
        epochs = [r["epoch"] + 1 for r in rows]
        first = 1.0 if single else (rows[0]["train_loss"] or 1.0)
        (line,) = loss.plot(epochs, [r["train_loss"] / first for r in rows], label=name)
        if rows[0].get("val_acc1") is not None:
            acc.plot(epochs, [r["val_acc1"] for r in rows], label="top-1" if single else name, color=line.get_color())
            if single:  # its own colour: the loss line took the first of the cycle, as top-1 did
                acc.plot(epochs, [r["val_acc5"] for r in rows], label="top-5", color="tab:orange")
    if single:
        rows = next(iter(runs.values()))
        axes[2].plot([r["epoch"] + 1 for r in rows], [r["lr"] for r in rows])
        axes[2].set_title("learning rate (end of epoch)")
    if reference:
        name, curve = reference
        acc.plot(sorted(curve), [curve[e] for e in sorted(curve)], "k--", label=name)  # x: epochs completed
    acc.set_title("val accuracy (%)" if single else "val top-1 (%)")
    loss.set_title("train loss" if single else "train loss / train loss of epoch 1")
    for a in axes:
        a.set_xlabel("epoch")
    for a in (acc, loss) if not single else (acc,):
        if a.get_lines():
            a.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Atomic: the trainer rewrites it after every epoch, and a run stopped mid-write keeps the previous plot.
    write_atomic(png, lambda f: fig.savefig(f, dpi=100, format=Path(png).suffix.lstrip(".").lower() or "png"))
    plt.close(fig)
    return True
