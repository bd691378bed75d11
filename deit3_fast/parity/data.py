"""The parity experiment's data: the two ImageFolders, converted once per storage into a cache beside --out.

`OUT-data/` holds `train-<storage>.beton` and `val-<storage>.beton` (with their reports) and `classes.txt`, the
training folder's class list, by which both splits are labelled: a class missing from the validation folder would
otherwise shift every label after it. A cached file is reused only while deit3-convert would write the same file
now (the same source files, labels and options: dataset_tools.convert.is_current); otherwise it is written again,
atomically, as deit3-convert writes every file. The cache is the command's own: nothing else is written there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dataset_tools.atomic import write_text_atomic

from ..schema import ConfigError
from .variants import ParityVariant, Storage


@dataclass(frozen=True)
class Folders:
    train: Path
    val: Path


def cache_dir(out: Path) -> Path:
    """Beside OUT, not in it: OUT holds only run dirs and results, and a second --out over the same folders (more
    epochs, other seeds) may point here too."""
    return out.parent / f"{out.name}-data"


def class_list(folders: Folders) -> list[str]:
    """The training folder's classes (sorted, as ImageFolder and deit3-convert label them); the validation folder
    may hold fewer, not others."""
    for split, path in (("--train-folder", folders.train), ("--val-folder", folders.val)):
        if not path.is_dir():
            raise ConfigError(f"{split} {path}: not a folder (an ImageFolder: one sub-folder of images per class)")
    train = sorted(p.name for p in folders.train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not train:
        raise ConfigError(f"--train-folder {folders.train}: no class folders in it (expected DIR/<class>/<image>)")
    extra = sorted(p.name for p in folders.val.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in extra if c not in set(train)]
    if unknown:
        raise ConfigError(
            f"--val-folder {folders.val}: class folder(s) {', '.join(unknown[:5])} are not in --train-folder "
            f"{folders.train}: both must be splits of the same classes"
        )
    return train


def beton_path(out: Path, split: str, storage: Storage) -> Path:
    return cache_dir(out) / f"{split}-{storage.name}.beton"


def data_paths(v: ParityVariant, out: Path, folders: Folders, val_storage: Storage) -> tuple[str, str]:
    """(data.train, data.val) of a variant: the folders themselves, or the cached .beton files."""
    if v.storage is None:
        return str(folders.train.resolve()), str(folders.val.resolve())
    return (
        str(beton_path(out, "train", v.storage).resolve()),
        str(beton_path(out, "val", val_storage).resolve()),
    )


def needed(variants: list[ParityVariant], out: Path, val_storage: Storage) -> list[tuple[str, Storage, Path]]:
    """(split, storage, path) of every .beton the variants read, each once, in the order of the variants."""
    todo: list[tuple[str, Storage, Path]] = []
    for v in variants:
        if v.storage is None:
            continue
        for split, st in (("train", v.storage), ("val", val_storage)):
            item = (split, st, beton_path(out, split, st))
            if item not in todo:
                todo.append(item)
    return todo


def prepare(
    variants: list[ParityVariant], out: Path, folders: Folders, val_storage: Storage, *, quiet: bool = False
) -> list[Path]:
    """Convert what the cache lacks (or holds stale); returns the files written now (reused ones are not)."""
    from dataset_tools.convert import convert, is_current

    todo = needed(variants, out, val_storage)
    if not todo:
        return []
    classes = class_list(folders)
    cache = cache_dir(out)
    cache.mkdir(parents=True, exist_ok=True)
    classes_file = cache / "classes.txt"
    text = "".join(c + "\n" for c in classes)
    if not classes_file.exists() or classes_file.read_text() != text:
        write_text_atomic(classes_file, text)
    written = []
    for split, storage, path in todo:
        src = str(folders.train if split == "train" else folders.val)
        options = storage.convert_options()
        if is_current(src, str(path), classes_file=str(classes_file), **options):
            if not quiet:
                print(f"[parity] {split} at {storage.name}: {path} (cached)", flush=True)
            continue
        if not quiet:
            print(f"[parity] converting {src} at {storage.name} -> {path}", flush=True)
        convert(src, str(path), classes_file=str(classes_file), show_progress=not quiet, **options)
        written.append(path)
    return written
