"""Finding the samples of an ImageFolder tree (`SRC/<class>/<...>/<file>`) and choosing deterministic subsets.

Labels follow torchvision's ImageFolder: the index of the class folder in sorted order. Every regular,
non-hidden file under a class folder is a candidate (its content decides whether it is an image, not its name);
sub-folders are walked, symbolic links followed, and a link that loops back is reported instead of followed.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SourceError


@dataclass
class Scan:
    classes: list[str]  # label order
    samples: list[tuple[str, int]]  # (path, label), sorted by label then path
    candidates_per_class: list[int]  # files found per class, before subsetting
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped while walking
    outside_classes: list[str] = field(default_factory=list)  # files directly in SRC, ignored


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Classes from a sidecar `.beton.json` (its `classes`), a shard folder or its manifest.json, or a text file
    with one class name per line."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        text = p.read_text()
    except OSError as e:
        raise SourceError(f"--classes {p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SourceError(
            f"--classes {p}: not text; give a class list (one name per line), a .beton's .json report or a shard folder"
        ) from None
    if p.suffix == ".json":
        try:
            classes = json.loads(text)["classes"]
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"--classes {p}: not a deit3-convert report or manifest (no 'classes' list)") from None
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not classes or len(set(classes)) != len(classes):
        raise SourceError(f"--classes {p}: the class list is empty or has duplicates")
    return [str(c) for c in classes]


def _walk_files(top: str, problems: list[tuple[str, str]]) -> list[str]:
    """All regular non-hidden files under `top`, following links, each directory visited once."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError as err:  # not `e`: the loop below names each entry e
            problems.append((d, f"unreadable folder: {err.strerror}"))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            problems.append((d, "symbolic link loop: folder already visited"))
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            problems.append((d, f"unreadable folder: {err.strerror}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=True):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=True):
                    out.append(e.path)
                elif e.is_symlink():
                    problems.append((e.path, "broken symbolic link"))
                else:
                    problems.append((e.path, "not a regular file"))
            except OSError as err:
                problems.append((e.path, f"unreadable: {err.strerror}"))
    return sorted(out)


def _subset(files: list[str], label: int, max_per_class: int | None, fraction: float | None, seed: int) -> list[str]:
    """A per-class subset that depends only on (seed, class, file list): stable across machines and runs."""
    if max_per_class is None and fraction is None:
        return files
    order = list(files)
    random.Random(f"{seed}:{label}").shuffle(order)
    k = len(order)
    if fraction is not None:
        k = min(k, max(1, math.floor(fraction * len(order) + 0.5))) if order else 0
    if max_per_class is not None:
        k = min(k, max_per_class)
    return sorted(order[:k])


def _folders_by_label(
    src: str, found: list[str], classes: list[str] | None, folder_labels: str
) -> tuple[list[str], dict[int, str]]:
    """(class list, {label: folder name}). `names`: a folder's label is its name's place in the class list (sorted
    names unless given). `index`: the folder's name is its label (ImageNet-V2's `0` ... `999`), so the class names
    come from the given list or are the indices themselves."""
    if folder_labels == "names":
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                raise SourceError(f"{len(unknown)} class folder(s) in {src} are not in the --classes list: {shown}")
        present = set(found)
        return classes, {label: name for label, name in enumerate(classes) if name in present}
    by_label: dict[int, str] = {}
    for name in found:
        if not (name.isascii() and name.isdigit()):
            raise SourceError(
                f"--folder-labels index: folder {name!r} in {src} is not a class index (folders must "
                "be named 0, 1, 2, ... as ImageNet-V2's are)"
            )
        label = int(name)
        if label in by_label:
            raise SourceError(
                f"--folder-labels index: folders {by_label[label]!r} and {name!r} in {src} are both class {label}"
            )
        if classes is not None and label >= len(classes):
            raise SourceError(
                f"--folder-labels index: folder {name!r} in {src} is class {label}, but the --classes "
                f"list has {len(classes)} classes (0..{len(classes) - 1})"
            )
        by_label[label] = name
    if classes is None:
        classes = [str(i) for i in range(max(by_label) + 1)] if by_label else []
    return classes, by_label


def is_image_folder(path: str | os.PathLike | None) -> bool:
    """A folder with class folders in it that is neither a shard set nor one being written (no manifest.json, no
    shard-*.beton): an ImageFolder tree, which only the reference engine reads as it is. (An empty folder is none of
    these, and is reported as a folder that is not a shard set.)"""
    if not path or not os.path.isdir(path):
        return False
    entries = list(os.scandir(os.fspath(path)))
    if any(e.name == "manifest.json" or (e.name.startswith("shard-") and e.name.endswith(".beton")) for e in entries):
        return False
    return any(not e.name.startswith(".") and e.is_dir() for e in entries)


def scan_imagefolder(
    src: str | os.PathLike,
    classes: list[str] | None = None,
    *,
    max_per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    folder_labels: str = "names",
) -> Scan:
    src = os.fspath(src)
    if not os.path.isdir(src):
        what = "does not exist" if not os.path.exists(src) else "is not a folder"
        raise SourceError(f"source folder {src} {what}")
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"source folder {src} cannot be read: {e.strerror}") from None
    found = [e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)]
    outside = [e.path for e in entries if not e.name.startswith(".") and not e.is_dir(follow_symlinks=True)]
    classes, folder_of = _folders_by_label(src, found, classes, folder_labels)
    if not classes:
        raise SourceError(f"no class folders in {src} (expected SRC/<class>/<image>, the ImageFolder layout)")

    problems: list[tuple[str, str]] = []
    samples: list[tuple[str, int]] = []
    per_class: list[int] = []
    for label in range(len(classes)):
        folder = folder_of.get(label)
        files = _walk_files(os.path.join(src, folder), problems) if folder is not None else []
        per_class.append(len(files))
        samples.extend((f, label) for f in _subset(files, label, max_per_class, fraction, seed))
    return Scan(classes, samples, per_class, problems, outside)


def split_holdout(samples: list[tuple[str, int]], k: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) indices into `samples`: k files of each class held out (all but one where a class has
    k or fewer), chosen by (seed, class, file list) alone, the same on every machine; both lists keep their order."""
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    held: set[int] = set()
    for label, ix in by_class.items():
        order = list(ix)
        random.Random(f"holdout:{seed}:{label}").shuffle(order)
        held.update(order[: min(k, len(order) - 1)])
    return [i for i in range(len(samples)) if i not in held], sorted(held)
