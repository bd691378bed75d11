"""The optimiser: its names, its config section (`optim`), the DeiT III weight-decay split, and `build`.

`lamb` (pre-training: apex `FusedLAMB` semantics, in lamb.py) | `adamw` (fine-tuning). No torch at import: the
config schema composes `OptimConfig` and checks `optim.name` against `OPTIMIZERS`, and every command loads its config
before torch starts; `build_optimizer` imports torch and lamb.py when it runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .schema import one_of

if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS = ("lamb", "adamw")


@dataclass
class OptimConfig:
    name: str = one_of("lamb", OPTIMIZERS)  # lamb (pre-training) | adamw (fine-tuning)
    lr: float = 4e-3  # used as-is (the recipes' --unscale-lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # LAMB's built-in global clipping

    def build(self, model: nn.Module, *, compile: bool = False) -> torch.optim.Optimizer:
        """This section's optimiser over `model`'s parameters (`compile`: train.compile, LAMB's step compiled)."""
        return build_optimizer(
            self.name,
            model,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=tuple(self.betas),
            eps=self.eps,
            max_grad_norm=self.max_grad_norm,
            compile=compile,
        )


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ("pos_embed", "cls_token", "dist_token")
) -> list[dict]:
    """[decay, no-decay] groups: DeiT III decays only matrices/kernels, never 1-D params (biases, norms, LayerScale
    gammas) nor the position embedding and class/distillation tokens."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Match whole dotted components so a wrapper prefix (`module.pos_embed`) still counts.
        if p.ndim <= 1 or skip.intersection(name.split(".")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    compile: bool = False,
) -> torch.optim.Optimizer:
    """`lamb` clips the global gradient norm inside its step; `adamw` ignores `max_grad_norm` (clip before it)."""
    # torch here, not at the top: the config imports this module, and loads and checks a config without torch.
    import torch

    from .lamb import Lamb

    groups = param_groups_weight_decay(model, weight_decay)
    if name == "lamb":
        return Lamb(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm, compile=compile
        )
    if name == "adamw":
        # fused=True is one kernel per step on CUDA (and a fused CPU kernel since torch 2.4).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


__all__ = ["OPTIMIZERS", "OptimConfig", "param_groups_weight_decay", "build_optimizer"]
