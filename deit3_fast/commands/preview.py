"""`deit3-fast preview`: one training batch as the model sees it, saved as a captioned grid."""

from __future__ import annotations

from ..config import ConfigError, load_config
from ._common import check_image_out as _image_out

NAME = "preview"
HELP = "save a grid of augmented training samples as a PNG"
DESCRIPTION = (
    "Runs the real training loader on --data-train and saves one batch as the model sees it (after crop, "
    "flip, RandAugment, 3-Augment, colour jitter and, unless --no-mix, mixup/cutmix), each sample captioned "
    "with its 3-Augment branch, its RandAugment ops and magnitudes, the mix the tile shows (mixup or cutmix, "
    "lambda: the sample's own share, and the partner sample blended in) and its classes (its own starred, each "
    "with its weight). Small images are enlarged so that the captions fit."
)


def add_arguments(v) -> None:
    v.add_argument("--cfg", required=True, help="recipe name (configs/) or YAML path")
    v.add_argument("--data-train", help="the .beton to preview (default: the config's data.train)")
    v.add_argument("--out", default="preview.png", help="the image to write (.png, .jpg, .pdf, .svg; preview.png)")
    v.add_argument("--n", type=int, default=32, help="samples in the grid (even; 32)")
    v.add_argument("--seed", type=int, default=0, help="data.seed: which samples and augmentations the batch gets (0)")
    v.add_argument("--no-mix", action="store_true", help="show the samples before mixup/cutmix")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")


def run(args) -> int:
    from pipelines.preview import make_preview

    from ..loaders import make_loader

    _image_out(args.out)
    sets = [*args.set, f"data.batch_size={args.n}", "data.repeats=1", f"data.seed={args.seed}", "train.amp=fp32"]
    if args.data_train:
        sets.append(f"data.train={args.data_train}")
    if args.no_mix:
        sets += ["aug.mixup=0", "aug.cutmix=0"]
    cfg = load_config(args.cfg, sets)
    import torch

    loader = make_loader(cfg, "train", torch.device("cpu"), auto_compile=False)
    if len(loader) == 0:  # training batches are whole: n above the set's size makes none
        raise ConfigError(f"--n {args.n}: more than the {loader.samples} samples of {cfg.data.train}; ask for fewer")
    info = make_preview(loader, cfg.aug.mean, cfg.aug.std, args.out)
    ops = f", RandAugment ops {info['randaug']}" if "randaug" in info else ""
    mix = f"{info['mix']} lam={info['lam']:.2f}" if "lam" in info else info["mix"]
    print(f"wrote {info['path']}: {info['samples']} samples, branches {info['branches']}{ops}, mix {mix}")
    return 0
