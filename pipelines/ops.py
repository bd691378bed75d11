"""The interface of a batch augmentation op, its parameters, and how its random draws are keyed.

An op (`AugOp`) is a stable `name`, a `draw(batch, generator) -> OpParams` and up to two ways of changing the batch:

- `eager(x, p)`: may have data-dependent shapes (on a CPU it computes only the samples it changes, see
  pixels.per_sample); runs unfused, in op order;
- `pointwise(x, p)`: whole-batch elementwise maths and selects only (no data-dependent shape, no host sync), so
  that `BatchAugment` can apply every op's pointwise part, in order, in one function that torch.compile fuses into a
  few passes over memory.

`BatchAugment` runs the eager parts of the ops, then their pointwise parts. So an op's eager part must commute with
the pointwise parts of the ops listed before it (the blur does with the flip: a symmetric kernel with symmetric edge
padding); an op whose eager part does not sets `barrier = True`, and every op before it then runs in full before it
(RandAugment: timm flips first).

Keying contract: op `name`'s draws for a batch come from a torch.Generator of its own, seeded with
`keys.named(batch_key, name)`, and from nothing else. So an op's parameters for a batch depend only on the batch
key, the op's name, its own settings and the device; adding, removing or reordering other ops leaves them bit for
bit unchanged (tests/pipelines/test_augment.py checks it with a fake op added). An op's name is therefore part of
the run's random stream: renaming an op changes its draws (which resumes, and reproduces old runs, rely on), and two
ops of one BatchAugment may not share a name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import torch

from . import keys


@dataclass
class OpParams:
    """One op's draws for a batch: tensor fields, the batch along dimension BATCH_DIM of each (a subclass with
    per-layer draws sets 1). Slicing, listing and moving are generic, so an op declares its fields and nothing else."""

    BATCH_DIM: ClassVar[int] = 0

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def slice(self, s: slice):
        index = (slice(None),) * self.BATCH_DIM + (s,)
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class AugParams(dict):
    """A batch's draws: op name -> that op's OpParams, in the order the ops ran."""

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.values() for t in p.tensors()]

    def slice(self, s: slice) -> AugParams:
        return AugParams({name: p.slice(s) for name, p in self.items()})

    def to(self, device) -> AugParams:
        return AugParams({name: p.to(device) for name, p in self.items()})


class AugOp:
    """Base of the ops: both parts default to doing nothing, so an op overrides the ones it has."""

    name: ClassVar[str]  # keys the op's random stream and its entry in AugParams: see the module docstring
    barrier: ClassVar[bool] = False
    tally_key: ClassVar[str | None] = None  # the key under which previews report `tally`

    def draw(self, batch: int, g: torch.Generator) -> OpParams:
        raise NotImplementedError

    def eager(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        return x

    def pointwise(self, x: torch.Tensor, p: OpParams) -> torch.Tensor:
        return x

    def describe(self, p: OpParams, sample: int) -> str:
        """What sample `sample` went through, for preview captions ('' when nothing worth a caption)."""
        return ""

    def tally(self, p: OpParams) -> dict[str, int]:
        """Counts over the batch for the preview's report (only called when `tally_key` is set)."""
        return {}


def op_generator(batch_key, name: str, device: torch.device) -> torch.Generator:
    """The generator op `name` draws from for the batch of `batch_key` (the keying contract above)."""
    g = torch.Generator(device=device)
    g.manual_seed(keys.seed_of(keys.named(np.uint64(batch_key), name)))
    return g


def draw(ops, batch: int, batch_key, device: torch.device) -> AugParams:
    """Every op's parameters for one batch, each from its own stream."""
    return AugParams({op.name: op.draw(batch, op_generator(batch_key, op.name, device)) for op in ops})
