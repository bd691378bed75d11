"""The grid's results from whatever its run dirs hold now (finished or not): results.csv, results.md, curves.png."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from dataset_tools.atomic import write_text_atomic

from .. import rundir
from .grid import Grid, Variant, format_assignment

DONE, FAILED, ATTEMPTS, JOB = "done.json", "failed.json", "ablate-attempts.jsonl", "ablate-job.json"


def read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def epochs_done(run_dir: Path) -> int:
    return len({r["epoch"] for r in rundir.read_metrics(run_dir)})


COLUMNS = [
    "variant",
    "status",
    "config",
    "epochs",
    "overrides",
    "final_top1",
    "final_top5",
    "best_top1",
    "gap",
    "img_per_s",
    "wall_s",
    "gpus",
    "gpu_hours",
]


def status(v: Variant, run_dir: Path, rows: list[dict] | None = None) -> str:
    rows = rundir.read_metrics(run_dir) if rows is None else rows
    done = read_json(run_dir / DONE)
    if done:
        return done.get("status", "done")
    failed = read_json(run_dir / FAILED)
    if failed:
        return f"failed after {len({r['epoch'] for r in rows})} epochs ({failed['error'].splitlines()[0][:100]})"
    if rows:
        return f"partial ({len({r['epoch'] for r in rows})}/{v.config.schedule.epochs} epochs)"
    job = read_json(run_dir / JOB)
    return f"submitted (job {job['job_id']})" if job else "not run"


def result_row(v: Variant, run_dir: Path) -> dict:
    rows = rundir.read_metrics(run_dir)
    acc = [r["val_acc1"] for r in rows if r.get("val_acc1") is not None]
    attempts = (
        [json.loads(x) for x in (run_dir / ATTEMPTS).read_text().splitlines() if x.strip()]
        if (run_dir / ATTEMPTS).exists()
        else []
    )
    wall = sum(a["seconds"] for a in attempts)
    gpu_s = sum(a["seconds"] * a["gpus"] for a in attempts)
    return {
        "variant": v.name,
        "status": status(v, run_dir, rows),
        "config": v.cfg,
        "epochs": v.config.schedule.epochs,
        "overrides": "; ".join(v.shown),
        "final_top1": rows[-1].get("val_acc1") if rows else None,
        "final_top5": rows[-1].get("val_acc5") if rows else None,
        "best_top1": max(acc) if acc else None,
        # vs the official curve, at the last official epoch reached (only where the variant follows a recipe)
        "gap": next((r["gap"] for r in reversed(rows) if r.get("gap") is not None), None),
        "img_per_s": sum(r["img_per_s"] for r in rows) / len(rows) if rows else None,
        "wall_s": wall if attempts else None,
        "gpus": max((a["gpus"] for a in attempts), default=None),
        "gpu_hours": gpu_s / 3600 if attempts else None,
    }


def format_value(value, digits: int = 1) -> str:
    """A table cell or progress-line figure: a float to `digits` places, – for none."""
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_duration(seconds: float | None) -> str:
    """Wall time as 45s, 3m05s or 2h07m; – for none."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def write_results(grid: Grid, out: Path) -> list[dict]:
    """results.csv, results.md and curves.png from whatever the run dirs hold now (finished or not)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [result_row(v, out / v.name) for v in grid.variants]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "results.csv", table.getvalue())
    common = ", ".join(f"`{format_assignment(s)}`" for s in grid.common) or "none"
    lines = [
        f"# Ablation `{grid.name}`",
        "",
        f"Grid `{grid.path}`; overrides of every variant: {common}. "
        f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        "| variant | status | config | overrides | epochs | final top-1 | final top-5 | best top-1 | gap "
        "| img/s | wall | GPU-hours (0 on CPU) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            r["variant"],
            r["status"],
            r["config"],
            r["overrides"] or "–",
            r["epochs"],
            format_value(r["final_top1"]),
            format_value(r["final_top5"]),
            format_value(r["best_top1"]),
            format_value(r["gap"], 2),
            format_value(r["img_per_s"], 0),
            format_duration(r["wall_s"]),
            format_value(r["gpu_hours"], 2),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "Top-1/top-5: validation accuracy (%) after the last epoch run and the best epoch. gap: top-1 minus "
        "the official curve's at the last official epoch reached (– where a variant follows no recipe; "
        "`deit3-fast compare` for the whole curve). img/s: mean "
        "training throughput over epochs, all processes together. wall: the variant's attempts added up "
        "(training, evaluation and start-up). GPU-hours: wall x GPUs used, 0 for CPU runs.",
        "",
    ]
    write_text_atomic(out / "results.md", "\n".join(lines))
    rundir.plot_curves(
        {v.name: rundir.read_metrics(out / v.name) for v in grid.variants},
        out / rundir.CURVES,
        title=f"ablation {grid.name}",
        overlay=True,
    )
    return rows


def print_results(out: Path) -> None:
    print((out / "results.md").read_text())
    print(f"[ablate] wrote {out / 'results.md'}, {out / 'results.csv'}, {out / rundir.CURVES}")
