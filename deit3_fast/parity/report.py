"""The parity verdict from whatever the run dirs hold now: per variant its seeds' top-1 (final and best, mean ± std),
speed and wall time; per variant against the baseline the top-1 difference with its interval and one line of
verdict (stats.compare_variants). Written to OUT/parity.md and OUT/parity.json, the same numbers in both."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from dataset_tools.atomic import write_text_atomic

from ..ablate.results import format_duration, format_value
from .stats import compare_variants, summarize

MARKDOWN, JSON = "parity.md", "parity.json"


def _mean_std(values: list[float]) -> dict:
    s = summarize(values)
    return {
        "mean": s.mean if s.n else None,
        "std": s.std if s.n > 1 else None,
        "values": values,
    }


def _cell(ms: dict) -> str:
    if ms["mean"] is None:
        return "–"
    return f"{ms['mean']:.2f}" + (f" ± {ms['std']:.2f}" if ms["std"] is not None else "")


def summarize_runs(plan: dict, rows: list[dict]) -> dict:
    """`rows`: ablate's result rows of the grid (one per variant x seed, named `VARIANT,seed=S`). A run counts
    once it is done (a diverged run is a result too: its last top-1); unfinished runs are listed, not averaged."""
    by_name = {r["variant"]: r for r in rows}
    variants = []
    finals: dict[str, list[float | None]] = {}
    for v in plan["variants"]:
        runs = [by_name.get(f"{v['name']},seed={s}") for s in plan["seeds"]]
        done = [
            r
            for r in runs
            if r
            and r["status"] in ("done", "diverged")
            and r["final_top1"] is not None
            and math.isfinite(r["final_top1"])
        ]
        finals[v["name"]] = [r["final_top1"] for r in done]
        speeds = [r["img_per_s"] for r in done if r["img_per_s"]]
        walls = [r["wall_s"] for r in done if r["wall_s"]]
        variants.append(
            {
                "variant": v["name"],
                "engine": v["engine"],
                "storage": v["storage"],
                "runs": len(runs),
                "finished": len(done),
                "unfinished": [
                    f"seed {s}: {r['status'] if r else 'not run'}" for s, r in zip(plan["seeds"], runs) if r not in done
                ],
                "final_top1": _mean_std([r["final_top1"] for r in done]),
                "best_top1": _mean_std([r["best_top1"] for r in done if r["best_top1"] is not None]),
                "img_per_s": sum(speeds) / len(speeds) if speeds else None,
                "wall_s": sum(walls) / len(walls) if walls else None,
            }
        )
    base = plan["baseline"]
    base_speed = next(v["img_per_s"] for v in variants if v["variant"] == base)
    for v in variants:
        v["speed_vs_baseline"] = v["img_per_s"] / base_speed if v["img_per_s"] and base_speed else None
    return {
        "recipe": plan["cfg"],
        "epochs": plan["epochs"],
        "seeds": plan["seeds"],
        "baseline": base,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "variants": variants,
        "comparisons": compare_variants(finals, reference=base, method=plan.get("method", "welch")),
    }


def markdown(summary: dict) -> str:
    base = summary["baseline"]
    lines = [
        f"# Parity: does each path train as well as `{base}`?",
        "",
        f"Recipe `{summary['recipe']}`, {summary['epochs']} epochs, seeds {', '.join(map(str, summary['seeds']))}; "
        f"everything but the engine and the storage is the same in every run. Written {summary['written']}.",
        "",
        f"| variant | engine | storage | runs | final top-1 | best top-1 | Δ final vs {base} (95%) | img/s "
        f"| speed vs {base} | wall per run |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    comp = {c["variant"]: c for c in summary["comparisons"]}
    for v in summary["variants"]:
        c = comp.get(v["variant"])
        if c is None:
            delta = "(baseline)"
        elif c["low"] is not None:
            delta = f"{c['delta']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"
        elif c["delta"] is not None:
            delta = f"{c['delta']:+.2f} (no interval)"
        else:
            delta = "–"
        speed = v["speed_vs_baseline"]
        cells = [
            v["variant"],
            v["engine"],
            v["storage"],
            f"{v['finished']}/{v['runs']}",
            _cell(v["final_top1"]),
            _cell(v["best_top1"]),
            delta.replace("-", "\u2212"),
            format_value(v["img_per_s"], 0),
            "–" if speed is None else f"{speed:.2f}x",
            format_duration(v["wall_s"]),
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines += ["", "Verdicts:", ""]
    lines += [f"- {c['verdict']}" for c in summary["comparisons"]]
    unfinished = [f"{v['variant']} {u}" for v in summary["variants"] for u in v["unfinished"]]
    if unfinished:
        lines += ["", "Not in the numbers yet: " + "; ".join(unfinished) + "."]
    lines += [
        "",
        "Top-1: validation accuracy (%) of each run after its last epoch and at its best epoch, mean ± standard "
        "deviation over seeds. Δ: mean final top-1 of the variant minus the baseline's, in points, with Welch's 95% "
        "interval over seeds. img/s: training throughput, mean over epochs and seeds; speed: its ratio to the "
        "baseline's. wall: training, evaluation and start-up of one run, mean over seeds.",
        "",
    ]
    return "\n".join(lines)


def write_report(plan: dict, rows: list[dict], out: Path) -> dict:
    summary = summarize_runs(plan, rows)
    write_text_atomic(out / JSON, json.dumps(summary, indent=1) + "\n")
    write_text_atomic(out / MARKDOWN, markdown(summary))
    return summary
