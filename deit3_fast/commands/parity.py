"""`deit3-fast parity`: does a fast path train as well as the official pipeline? (the parity package runs it)."""

from __future__ import annotations

from ..parity.variants import DEFAULT_STORAGE, DEFAULT_VAL_STORAGE
from ._common import add_grid_submit_args

NAME = "parity"
HELP = "train the same recipe through several engines x seeds and say whether they reach the same accuracy"
DESCRIPTION = (
    "Trains one recipe through each variant (an engine, optionally at a storage: reference, ffcv@max256, "
    "nvjpeg@short448, reference@beton) with several seeds, everything else equal, and compares each variant's "
    "final top-1 with the baseline's (reference: the official PIL/torchvision pipeline on the original files): "
    "the difference with a 95% interval over seeds (Welch) and a one-line verdict. The folders are converted once "
    "per storage into OUT-data/ (reused while current). Runs go through ablate's machinery: resumable, --submit "
    "sends each run to Slurm. Writes OUT/parity.md and OUT/parity.json; docs/evaluation.md#parity."
)


def add_arguments(a) -> None:
    a.add_argument("--cfg", help="recipe name in configs/ (e.g. cifar10_vit_tiny, imagenet100_vit_s) or a YAML path")
    a.add_argument("--train-folder", metavar="DIR", help="training ImageFolder (DIR/<class>/<image>)")
    a.add_argument("--val-folder", metavar="DIR", help="validation ImageFolder, the same classes")
    a.add_argument(
        "--variants",
        default="reference,ffcv",
        help="comma-separated ENGINE[@STORAGE] (default: reference,ffcv); STORAGE: max<N>, short<N>, q<Q>, raw "
        "joined by +, beton (= --storage) or folder",
    )
    a.add_argument("--baseline", default="reference", help="the variant the others are compared with (reference)")
    a.add_argument("--seeds", default="3", help="a count (3: seeds 0, 1, 2) or a list (0,1,2)")
    a.add_argument("--epochs", type=int, help="override schedule.epochs (the warm-up is scaled with it)")
    a.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"the .beton storage of a variant without @ that cannot read folders ({DEFAULT_STORAGE})",
    )
    a.add_argument(
        "--val-storage",
        default=DEFAULT_VAL_STORAGE,
        help=f"the validation .beton's storage for every .beton variant ({DEFAULT_VAL_STORAGE}; beton: --storage)",
    )
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (repeatable)",
    )
    a.add_argument("--out", help="run dirs and the verdict (default: runs/parity/<recipe>); conversions in OUT-data/")
    a.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    a.add_argument("--json", action="store_true", help="print the verdict as JSON (progress goes to stderr)")
    a.add_argument("--dry-run", action="store_true", help="list the conversions and runs, and exit")
    a.add_argument("--collect", action="store_true", help="only write the verdict from OUT's run dirs; run nothing")
    a.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_grid_submit_args(a, "run", "; conversion runs here first")


def run(args) -> int:
    from ..parity.run import run_parity

    return run_parity(args)
