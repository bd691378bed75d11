"""`deit3-fast compare RUN_DIR [RUN_DIR ...] [--reference NAME]`: runs side by side, epoch by epoch, and against an
official curve: a table (every official epoch, or every epoch without a reference; long tables thinned to about 25
rows, the last epoch always kept), JSON with every row ({epoch, acc1: {run: top-1}, official, gaps: {run: gap}}),
and a plot. Ablation variants are run dirs too.

Epochs are counted as completed epochs (a run's metrics.jsonl row k is epoch k + 1), as the official curves are.
"""

from __future__ import annotations

from pathlib import Path

from . import reference as ref
from . import rundir
from .config import ConfigError


def _reference_of(runs: dict[str, Path], given: str | None) -> str | None:
    if given == "none":
        return None
    if given:
        ref.official_curve(given)  # an unknown name is a ConfigError listing the known ones
        return given
    import json

    named = set()
    for path in runs.values():
        try:
            named.add(json.loads((path / rundir.FACTS).read_text()).get("reference"))
        except (OSError, ValueError):
            named.add(None)
    return named.pop() if len(named) == 1 else None  # the recipe all the runs follow, if they agree


def compare(run_dirs: list[str], reference: str | None = None, max_rows: int = 25) -> dict:
    runs = {}
    for d in run_dirs:
        p = Path(d)
        if not (p / rundir.METRICS).exists():
            raise ConfigError(f"{d}: not a run dir (no {rundir.METRICS})")
        runs[p.name if p.name not in runs else str(p)] = p
    name = _reference_of(runs, reference)
    curve = ref.official_curve(name) if name else {}
    acc = {n: {r["epoch"] + 1: r.get("val_acc1") for r in rundir.read_metrics(p)} for n, p in runs.items()}
    last = max((e for a in acc.values() for e in a), default=0)
    epochs = sorted(e for e in curve if 0 < e <= last) if curve else sorted({e for a in acc.values() for e in a})
    # Each run's numbers under its own key, so that no run dir's name (epoch, official, ...) clashes with a column
    rows = [{"epoch": e, "acc1": {n: a.get(e) for n, a in acc.items()}} for e in epochs]
    for row in rows:
        if curve:
            row["official"] = curve[row["epoch"]]
            row["gaps"] = {n: v - row["official"] for n, v in row["acc1"].items() if v is not None}
    note = None
    if curve and not rows:  # an empty table would say nothing: which epochs each side has, and the way out
        reached = ", ".join(f"{n} {max(a, default=0)}" for n, a in acc.items())
        note = (
            f"no run has reached an epoch of the official {name} curve (it has epochs {_epochs(curve)}); epochs "
            f"completed: {reached}. --reference none shows every epoch"
        )
    step = max(1, -(-len(rows) // max_rows))
    shown = [r for i, r in enumerate(rows) if i % step == 0 or i == len(rows) - 1]
    return {"runs": {n: str(p) for n, p in runs.items()}, "reference": name, "rows": rows, "shown": shown, "note": note}


def _epochs(curve: dict[int, float]) -> str:
    """A curve's epochs (epoch 0, the initial model, left out), long runs of them shortened: 5, 10, ..., 800."""
    es = sorted(e for e in curve if e > 0)
    return ", ".join(map(str, es)) if len(es) <= 4 else f"{es[0]}, {es[1]}, ..., {es[-1]}"


def render(result: dict) -> None:
    from rich.table import Table

    from dataset_tools.console import make_console

    names = list(result["runs"])
    title = "val top-1 (%) by epochs completed" + (f"; official: {result['reference']}" if result["reference"] else "")
    t = Table(title=title, title_justify="left")
    t.add_column("epoch", justify="right")
    for n in names:
        t.add_column(n, justify="right")
    if result["reference"]:
        t.add_column("official", justify="right")
    for r in result["shown"]:
        cells = []
        for n in names:
            v = r["acc1"][n]
            gap = r.get("gaps", {}).get(n)
            cells.append("–" if v is None else f"{v:.2f}" + (f" ({gap:+.2f})" if gap is not None else ""))
        t.add_row(str(r["epoch"]), *cells, *([f"{r['official']:.2f}"] if result["reference"] else []))
    make_console().print(t)


def plot(result: dict, png: str | Path) -> bool:
    runs = {n: rundir.read_metrics(Path(p)) for n, p in result["runs"].items()}
    curve = ref.official_curve(result["reference"]) if result["reference"] else None
    last = max((r["epoch"] + 1 for rows in runs.values() for r in rows), default=0)
    return rundir.plot_curves(
        runs,
        Path(png),
        title="compare",
        overlay=len(runs) > 1,
        reference=(f"official {result['reference']}", {e: v for e, v in curve.items() if e <= last}) if curve else None,
    )
