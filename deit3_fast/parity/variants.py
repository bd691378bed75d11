"""What `--variants` names: an engine, optionally at a storage (`ffcv@max256`, `reference@beton`), and what each
storage means to deit3-convert.

A storage is `+`-joined parts: `max<N>` (longer side resized down to N: convert's --max-resolution), `short<N>`
(shorter side down to N: --short-side), `q<Q>` (JPEG quality), `raw` (decoded pixels, no JPEG: --write-mode raw),
or `beton` (the command's default storage, --storage). A variant without `@` reads the ImageFolder as it is when its
engine can (the `reference` engine: the official pipeline on the original files) and the default storage otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.registry import ENGINES, engine_info

from ..schema import ConfigError, closest

DEFAULT_STORAGE = "max256"  # convert's default: what a .beton holds unless the user asked otherwise
DEFAULT_VAL_STORAGE = "short448"  # the recipes' val: eval inputs within 40 dB of the official ones (BENCHMARKS.md)
FOLDER = "folder"  # the storage of a variant that reads the ImageFolder itself


@dataclass(frozen=True)
class Storage:
    """How deit3-convert writes a .beton; `name` is canonical (the same storage always has the same name)."""

    max_resolution: int | None = None
    short_side: int | None = None
    jpeg_quality: int = 90
    raw: bool = False

    @property
    def name(self) -> str:
        parts = [f"short{self.short_side}" if self.short_side else f"max{self.max_resolution or 256}"]
        if self.jpeg_quality != 90:
            parts.append(f"q{self.jpeg_quality}")
        if self.raw:
            parts.append("raw")
        return "+".join(parts)

    def convert_options(self) -> dict:
        """Keyword arguments of dataset_tools.convert.convert."""
        return {
            "max_resolution": None if self.short_side else (self.max_resolution or 256),
            "short_side": self.short_side,
            "jpeg_quality": self.jpeg_quality,
            "write_mode": "raw" if self.raw else "jpg",
        }


def parse_storage(spec: str, default: Storage | None = None, where: str = "storage") -> Storage:
    if spec == "beton" and default is not None:
        return default
    fields: dict = {}
    for part in spec.split("+"):
        m = re.fullmatch(r"(max|short|q)(\d+)|(raw)", part)
        if not m:
            alone = ", or beton (the default storage) alone" if default is not None else ""
            raise ConfigError(
                f"{where} '{spec}': '{part}' is not a storage part (max<N>, short<N>, q<QUALITY>, raw{alone}; "
                "e.g. max256, short448, short448+q95, raw)"
            )
        key = {"max": "max_resolution", "short": "short_side", "q": "jpeg_quality"}.get(m.group(1), "raw")
        sides = {"max_resolution", "short_side"}
        if key in fields or (key in sides and fields.keys() & sides):
            raise ConfigError(f"{where} '{spec}': '{part}' sets what another part already set")
        value = True if m.group(3) else int(m.group(2))
        if key == "jpeg_quality" and not 1 <= value <= 100:
            raise ConfigError(f"{where} '{spec}': JPEG quality {value} is not in 1-100")
        if key in ("max_resolution", "short_side") and value < 8:
            raise ConfigError(f"{where} '{spec}': {part}: a side under 8 pixels")
        fields[key] = value
    return Storage(**fields)


@dataclass(frozen=True)
class ParityVariant:
    name: str  # as given (and its run dirs' prefix): `ffcv@max256`
    engine: str
    storage: Storage | None  # None: the ImageFolder as it is


def parse_variants(spec: str, default: Storage) -> list[ParityVariant]:
    """`reference,ffcv@max256,nvjpeg` as variants; a name twice, an unknown engine or a folder given to an engine
    that cannot read one is an error naming the fix."""
    out: list[ParityVariant] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ConfigError(f"--variants '{spec}': an empty entry (names are separated by single commas)")
        engine, at, storage = item.partition("@")
        if engine not in ENGINES:
            raise ConfigError(
                f"--variants: '{engine}' is not an engine (one of {', '.join(ENGINES)})" + closest(engine, ENGINES)
            )
        if at and storage == FOLDER:
            st = None
        elif at:
            st = parse_storage(storage, default, where=f"--variants {item}")
        else:
            st = None if engine_info(engine).reads_image_folders else default
        if st is None and not engine_info(engine).reads_image_folders:
            raise ConfigError(f"--variants {item}: the {engine} engine reads .beton files, not folders: drop '@folder'")
        if item in (v.name for v in out):
            raise ConfigError(f"--variants: '{item}' is given twice")
        out.append(ParityVariant(item, engine, st))
    if len(out) < 2:
        raise ConfigError(f"--variants '{spec}': parity compares at least two variants (e.g. reference,ffcv)")
    return out
