"""`deit3-fast profile --tune`: the loader settings that feed the model fastest on this machine and this data.

Tries each installed engine, in the registry's order, with several `data.workers` counts, cheapest first, where the
engine uses them on this device (and `data.os_cache` both ways where the engine takes it), then `train.compile` on
the best of them; each is a short `profile` of the real run. The winner is the setting with the fastest measured
end-to-end rate (the median of its repeats): what a run gets is the end-to-end rate, and a threshold on its ratio
to model-alone would let a noisy model-alone figure pass a slow setting. It is written as an override YAML
(`--overrides FILE` on any command). A candidate is started only if the time spent plus the slowest one so far
still fits `budget_s`, so tuning ends within the budget unless a try runs longer than every earlier one. Each row
records what that decision saw (`started_s`, `slowest_before_s`), and `refused` the last try it turned down.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import yaml

from pipelines.registry import engine_info, engine_names

from .config import Config
from .profile import profile


def candidates(cfg: Config, device_type: str) -> list[dict]:
    """The settings to try on a `device_type` device. A knob an engine ignores there keeps the config's value: two
    candidates that differ only in it would be the same run, measured twice (nvjpeg's workers on a GPU)."""
    cores = len(os.sched_getaffinity(0))
    out = []
    for engine in engine_names():
        info = engine_info(engine)
        # The reference engine (host_augment) is the per-sample yardstick, never the fastest setting: not a candidate.
        if not info.installed or info.host_augment:
            continue
        workers = (
            sorted({max(1, cores // 4), max(1, cores // 2), cores})
            if info.uses_workers(device_type)
            else [cfg.data.workers]
        )
        for w in workers:
            for os_cache in (True, False) if info.os_cache else (cfg.data.os_cache,):
                out.append({"data.engine": engine, "data.workers": w, "data.os_cache": os_cache})
    return out


def _apply(cfg: Config, setting: dict) -> Config:
    data = replace(
        cfg.data, engine=setting["data.engine"], workers=setting["data.workers"], os_cache=setting["data.os_cache"]
    )
    return replace(cfg, data=data, train=replace(cfg.train, compile=setting.get("train.compile", cfg.train.compile)))


def tune(cfg: Config, device, budget_s: float = 300.0, steps: int = 5, log=print, clock=time.perf_counter) -> dict:
    # `clock` (seconds): injectable, so a test checks the budget's decisions without depending on this machine's speed.
    started, slowest = clock(), 0.0
    tried: list[dict] = []
    refused = None

    def attempt(setting: dict) -> bool:
        nonlocal slowest, refused
        t = clock()
        if tried and t - started + slowest > budget_s:
            refused = {**setting, "at_s": t - started, "slowest_s": slowest}
            return False
        try:
            # One pass (tries=1): the ranking reads the end-to-end rate alone, which a failed ratio leaves standing;
            # a second pass would only spend the budget on the verdict shown beside it.
            r = profile(_apply(cfg, setting), device, steps=steps, tries=1)
            row = {
                **setting,
                "end_to_end_img_per_s": r["end_to_end_img_per_s"],
                "end_to_end_spread": r["spread"]["end_to_end_img_per_s"],
                "loader_img_per_s": r["loader_img_per_s"],
                "ratio": r["ratio"],
                "verdict": r["verdict"],
            }
        except Exception as e:  # noqa: BLE001 - a setting that cannot run here is a result, not a crash
            row = {**setting, "error": (str(e).strip() or type(e).__name__).splitlines()[0][:200]}
        row["seconds"] = clock() - t
        row["started_s"], row["slowest_before_s"] = t - started, slowest
        slowest = max(slowest, row["seconds"])
        tried.append(row)
        log(_line(row))
        return True

    for setting in candidates(cfg, device.type):
        if not attempt(setting):
            break
    ok = [r for r in tried if "error" not in r]
    if ok and not cfg.train.compile:  # compiling pays off for the model and BatchAugment: try it on the best
        best = fastest(ok)
        attempt({k: best[k] for k in ("data.engine", "data.workers", "data.os_cache")} | {"train.compile": True})
        ok = [r for r in tried if "error" not in r]
    if not ok:
        raise RuntimeError("no setting could run: " + "; ".join(r["error"] for r in tried))
    best = fastest(ok)
    overrides = {
        "data": {"engine": best["data.engine"], "workers": best["data.workers"], "os_cache": best["data.os_cache"]},
        "train": {"compile": bool(best.get("train.compile", cfg.train.compile))},
    }
    return {
        "tried": tried,
        "best": best,
        "overrides": overrides,
        "seconds": clock() - started,
        "budget_s": budget_s,
        "refused": refused,
    }


def fastest(rows: list[dict]) -> dict:
    """The row with the fastest measured end-to-end rate: the ranking, whatever each row's ratio or verdict."""
    return max(rows, key=lambda r: r["end_to_end_img_per_s"])


def _line(r: dict) -> str:
    what = (
        f"{r['data.engine']:<6} workers {r['data.workers']:<3} os_cache {str(r['data.os_cache']):<5} "
        f"compile {str(r.get('train.compile', False)):<5}"
    )
    if "error" in r:
        return f"{what}  failed: {r['error']}"
    sp = r["end_to_end_spread"]
    return (
        f"{what}  end-to-end {r['end_to_end_img_per_s']:,.0f} img/s ({sp['min']:,.0f} - {sp['max']:,.0f}; "
        f"{r['ratio']:.0%} of the model alone, {r['verdict']})  [{r['seconds']:.0f} s]"
    )


def write_overrides(result: dict, path: str) -> None:
    from dataset_tools.atomic import write_text_atomic

    b = result["best"]
    head = (
        f"# deit3-fast profile --tune: the fastest measured end to end, {b['end_to_end_img_per_s']:,.0f} img/s "
        f"({b['ratio']:.0%} of the model alone: {b['verdict']}). Use: --overrides {path}\n"
    )
    write_text_atomic(path, head + yaml.safe_dump(result["overrides"], sort_keys=True))
