"""`deit3-fast ablate --grid GRID`: does a recipe change help? Short-schedule ablations, one run dir per variant.

A grid file (YAML; `--grid` takes a path or a name in configs/ablations/):

    base: cifar10_deit3              # config name or path: every variant starts from it
    sets:                            # optional: applied to every variant (a mapping, or a list of key=value)
      data.workers: 4
    variants:                        # optional: named override sets; a variant may start from its own config
      - name: deit3
      - name: deit_style
        cfg: cifar10_deit_style
      - name: no_3aug
        sets: {aug.three_augment: false}
    axes:                            # optional: a product over config keys, crossed with `variants` if both given
      schedule.epochs: [30, 100]
      loss: [bce, ce]

A variant is its config + the grid's `sets` + `--set` from the command line + its own sets + its axis values, in
that order (later wins). Names are stable and readable: a named variant keeps its name and each axis adds
`key=value` (the key's last part, the full key when two axes share it), joined by commas, e.g.
`deit3,epochs=30,loss=bce`; the run dir is `OUT/NAME` (OUT defaults to runs/ablate/<grid file stem>). Every
variant is resolved and validated before anything runs: an unknown key, a bad axis, a missing config or a
duplicate name is one ConfigError, and so are (for the variants still to run) a batch that does not divide the
global batch and missing data files.

Epoch budgets: when the overrides change `schedule.epochs` and none sets `schedule.warmup_epochs`, the warm-up is
scaled by the same factor (rounded half up, at least 1 when the config had one). The cosine always spans
schedule.epochs (schedule.py), so a 30-epoch variant is a compressed copy of the 100-epoch schedule.

Resumable: a variant is finished when its run dir has `done.json` (written when all epochs are in metrics.jsonl, or
when the run diverged: that is a result too). Finished variants are skipped; an interrupted one continues from
its checkpoint-last.pt (`resume="auto"`). A variant that crashes gets `failed.json` (the traceback), the grid goes
on and the command exits 1; the next run retries it. SIGTERM (Preempted) and Ctrl-C stop the grid. A run dir
written with a different config is an error, not a silent mix. Each attempt's wall time is appended to
`ablate-attempts.jsonl` (also on Ctrl-C or an exception; a SIGKILLed attempt's time is lost). After every
variant, OUT gets `results.csv`, `results.md` (one row per variant, unrun ones included) and `curves.png` (val
top-1 and train loss against epoch, all variants overlaid).

`--submit` sends each unfinished variant to Slurm as its own submitit job (the parameters of `deit3-fast submit`,
preemption-safe requeue included) and records the job in `ablate-job.json`; a variant with a recorded job is not
submitted again unless `--resubmit`. The jobs write done.json and the attempt times themselves; `--collect` (or
any later run of the command) writes the results from the run dirs. `--local` runs the jobs one after another
through submitit's local executor and writes the results at the end.
"""

from __future__ import annotations

from .grid import ABLATIONS_DIR, Grid, Variant, load_grid
from .results import DONE, FAILED, write_results
from .run import AblateJob, execute, run_grid, run_variant

__all__ = [
    "ABLATIONS_DIR",
    "Grid",
    "Variant",
    "load_grid",
    "write_results",
    "run_grid",
    "execute",
    "run_variant",
    "AblateJob",
    "DONE",
    "FAILED",
]
