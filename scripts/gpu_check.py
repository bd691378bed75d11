"""The Python half of scripts/gpu-check.sh: the data it reads and the summary.json it keeps.

    python scripts/gpu_check.py prepare DIR            # DIR/imagenet.beton from ../shared/data (here, then carried)
    python scripts/gpu_check.py data DIR IMAGENET|-    # DIR: the cuda tests' tiny .betons + imagenet.beton (a link to
                                                       # IMAGENET, or with -, a small synthetic stand-in: quick mode)
    python scripts/gpu_check.py init OUT MODE STEP=LIMIT_S ...   # summary.json: every step pending
    python scripts/gpu_check.py start OUT STEP LIMIT_S           # the step is running (under that limit)
    python scripts/gpu_check.py done OUT STEP EXIT T0 [RESULT]  # its status, seconds since T0 (epoch seconds) and
                                                                # numbers (RESULT: the step's .json or JUnit .xml)

summary.json is replaced atomically at every change, so a call cut short anywhere leaves a whole file that says how
far it got. Needs nothing beyond the standard library but for `prepare` and `data` (numpy, PIL, the repo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[1]
TIMED_OUT = (124, 137)  # timeout(1)'s status after its first signal, and after the KILL that follows


def write_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _summary(out: Path) -> tuple[Path, dict]:
    path = out / "summary.json"
    return path, json.loads(path.read_text())


def init(out: Path, mode: str, limits: list[str]) -> None:
    steps = {}
    for item in limits:
        name, _, limit = item.partition("=")
        steps[name] = {"status": "pending", "limit_s": int(limit)}
    write_atomically(
        out / "summary.json",
        {
            "mode": mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "budget_s": sum(s["limit_s"] for s in steps.values()),
            "finished": None,
            "steps": steps,
        },
    )


def start(out: Path, name: str, limit: int) -> None:
    path, summary = _summary(out)
    summary["steps"][name].update(status="running", limit_s=limit)
    write_atomically(path, summary)


def junit_numbers(path: Path) -> dict:
    """Counts and each test's outcome from pytest's JUnit XML (written also when pytest is interrupted)."""
    root = ElementTree.parse(path).getroot()
    outcomes = {}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = {
            "outcome": outcome,
            "seconds": round(float(case.get("time") or 0), 2),
        }
    counts = {k: sum(o["outcome"] == k for o in outcomes.values()) for k in ("passed", "failure", "error", "skipped")}
    return {**counts, "tests": outcomes}


def done(out: Path, name: str, rc: int, t0: float, result: Path | None) -> None:
    seconds = round(time.time() - t0, 1)
    path, summary = _summary(out)
    step = summary["steps"][name]
    step.update(status="ok" if rc == 0 else "timeout" if rc in TIMED_OUT else "failed", exit=rc, seconds=seconds)
    if result is not None and result.is_file():
        try:
            step["numbers"] = junit_numbers(result) if result.suffix == ".xml" else json.loads(result.read_text())
        except (ValueError, ElementTree.ParseError) as e:  # a file cut off by the kill: say so, keep the rest
            step["numbers"] = {"unreadable": f"{result.name}: {e}"}
    if all(s["status"] not in ("pending", "running") for s in summary["steps"].values()):
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_atomically(path, summary)
    print(f"== {name}: {step['status']} (exit {rc}) after {seconds:.0f}s of {step['limit_s']}s", flush=True)


def prepare(folder: Path) -> None:
    """The real photos the GPU machine cannot make: the shared ImageNet sample at the recipe's storage."""
    import tarfile
    import tempfile

    sys.path.insert(0, str(REPO))
    from dataset_tools.convert import convert
    from tests.conftest import SHARED_DATA

    tar = SHARED_DATA / "imagenet-sample-1000.tar"
    if not tar.exists():
        sys.exit(f"{tar} is absent: the GPU check's engine, model and parity steps need the real ImageNet sample")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tar) as t:
        t.extractall(tmp, filter="data")
        convert(
            f"{tmp}/imagenet-sample-1000",
            str(folder / "imagenet.beton"),
            max_resolution=256,
            jpeg_quality=90,
            show_progress=False,
            page_size=2 << 20,
        )
    size = sum(p.stat().st_size for p in folder.glob("imagenet.beton*"))
    print(f"wrote {folder}/imagenet.beton ({size / 2**20:.1f} MiB): name {folder.relative_to(REPO).parts[0]} in carry")


def data(folder: Path, imagenet: str) -> None:
    """The `data` fixture's tiny files (a second or two: the GPU machine makes them itself) and imagenet.beton."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_tiny_data

    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_data(folder, page_size=2 << 20)
    if imagenet != "-":
        (folder / "imagenet.beton").symlink_to(Path(imagenet).resolve())
        return
    from dataset_tools.convert import convert
    from dataset_tools.synthetic import make_imagefolder

    make_imagefolder(folder / "src" / "stand_in", num_classes=4, per_class=8, seed=7, min_side=96, max_side=320)
    convert(
        str(folder / "src" / "stand_in"),
        str(folder / "imagenet.beton"),
        max_resolution=256,
        jpeg_quality=90,
        workers=1,
        show_progress=False,
        page_size=2 << 20,
    )


def main(argv: list[str]) -> None:
    verb, args = argv[0], argv[1:]
    if verb == "prepare":
        prepare(Path(args[0]).resolve())
    elif verb == "data":
        data(Path(args[0]), args[1])
    elif verb == "init":
        init(Path(args[0]), args[1], args[2:])
    elif verb == "start":
        start(Path(args[0]), args[1], int(args[2]))
    elif verb == "done":
        done(Path(args[0]), args[1], int(args[2]), float(args[3]), Path(args[4]) if len(args) > 4 else None)
    else:
        sys.exit(f"gpu_check.py: unknown verb {verb!r} (prepare, data, init, start, done)")


if __name__ == "__main__":
    main(sys.argv[1:])
