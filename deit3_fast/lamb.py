"""LAMB with apex `FusedLAMB` semantics, the pre-training optimiser (optim.py chooses between it and AdamW).

The official DeiT III recipes pass `--opt fusedlamb`, which timm maps to NVIDIA apex's `FusedLAMB` with its defaults
(`adam_w_mode=True`, `grad_averaging=True`, `use_nvlamb=False`, `max_grad_norm=1.0`). The published numbers depend on
those exact maths, so `Lamb` reproduces apex/optimizers/fused_lamb.py + csrc/multi_tensor_lamb.cu without needing
apex's CUDA extension:

1. one global L2 norm over the gradients of every parameter in every group; if it exceeds `max_grad_norm`, every
   gradient is divided by `norm / max_grad_norm` (inside the step, so no separate `clip_grad_norm_` is needed);
2. Adam moments on the clipped gradient with bias correction, `update = m_hat / (sqrt(v_hat) + eps) + wd * p`;
3. the trust ratio `||p|| / ||update||` only in groups whose weight decay is non-zero, and only when both norms are
   non-zero (else 1), then `p -= lr * ratio * update`.

Everything runs as `torch._foreach_*` ops over whole tensor lists, and the clip factor and trust ratios stay on the
device, so a step never waits for the GPU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms as one 1-D tensor; half-precision inputs are accumulated and returned in fp32 (as apex's
    l2norm kernel does), so a large fp16 norm cannot overflow."""
    kw = {"dtype": torch.float32} if tensors[0].dtype in _LOW_PRECISION else {}
    return torch.stack(torch._foreach_norm(tensors, 2, **kw))


class Lamb(torch.optim.Optimizer):
    """LAMB with apex `FusedLAMB(adam_w_mode=True, grad_averaging=True, use_nvlamb=False)` semantics.

    `max_grad_norm` is global (like apex, which reads it from the defaults, not per group); 0 disables clipping
    (apex has no such switch: there `norm / 0` would zero every gradient).
    Unlike apex, which overwrites `.grad` with the update, gradients are left untouched. `compile=True` runs the
    same maths through torch.compile.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        bias_correction: bool = True,
        compile: bool = False,
    ):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if max_grad_norm < 0.0:
            raise ValueError(f"invalid max_grad_norm: {max_grad_norm}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)
        # torch.compile fuses the ~15 passes over every tensor list into a few loops (CPU) or kernels (GPU): the
        # step is memory-bound, so that is most of its time (benchmarks/lamb.py). Compiling costs seconds once.
        self._compiled = torch.compile(_lamb_update, dynamic=False) if compile else None

    def _buckets(self, group: dict) -> dict[tuple, tuple[list, list, list, list]]:
        """(params, grads, exp_avgs, exp_avg_sqs) per (device, dtype): foreach kernels need one of each per call."""
        out: dict[tuple, tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ps, gs, ms, vs = out[(p.device, p.dtype)]
            ps.append(p)
            gs.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
        return out

    def _clip_factor(self, buckets: list[dict]) -> torch.Tensor | None:
        """`global_norm / max_grad_norm` where the global norm exceeds it, else 1, as a device tensor (no sync)."""
        max_norm = self.defaults["max_grad_norm"]
        if max_norm <= 0.0:
            return None
        per_bucket = [_norms(gs) for b in buckets for _, gs, _, _ in b.values()]
        if not per_bucket:
            return None
        dev = per_bucket[0].device
        acc = torch.float64 if any(n.dtype == torch.float64 for n in per_bucket) else torch.float32
        global_norm = torch.linalg.vector_norm(torch.cat([n.to(dev, acc) for n in per_bucket]))
        return torch.where(global_norm > max_norm, global_norm / max_norm, torch.ones_like(global_norm))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        buckets = [self._buckets(group) for group in self.param_groups]
        clip = self._clip_factor(buckets)

        for group, group_buckets in zip(self.param_groups, buckets):
            # apex counts steps per group and advances every group, even one without gradients this step.
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            beta1, beta2 = group["betas"]
            bc1 = 1.0 - beta1**t if group["bias_correction"] else 1.0
            bc2 = 1.0 - beta2**t if group["bias_correction"] else 1.0
            for params, grads, exp_avgs, exp_avg_sqs in group_buckets.values():
                dev, dtype = params[0].device, params[0].dtype
                factor = clip.to(dev, dtype) if clip is not None else torch.ones((), device=dev, dtype=dtype)
                scalars = (group["lr"], bc1, bc2)
                if self._compiled is not None:
                    # As tensors, so a new learning rate or step count is new data, not a recompilation. Filled on
                    # the device: torch.tensor(v, device=cuda) would be a blocking copy, three per bucket per step.
                    scalars = tuple(torch.full((), v, device=dev, dtype=dtype) for v in scalars)
                update = self._compiled or _lamb_update
                update(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    factor,
                    *scalars,
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss


def _lamb_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    clip,
    lr,
    bc1,
    bc2,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One LAMB step for same-device, same-dtype tensor lists. `clip` divides the gradients (a clipped copy, not
    in-place: the caller may still read .grad); lr, bc1, bc2 are numbers or 0-d tensors."""
    scaled = torch._foreach_div(grads, clip)
    torch._foreach_lerp_(exp_avgs, scaled, 1.0 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, scaled, scaled, value=1.0 - beta2)
    del scaled
    # apex adds eps after the bias-corrected sqrt: sqrt(v / bc2) + eps.
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, bc1)
    torch._foreach_div_(updates, denom)
    del denom
    if weight_decay == 0.0:
        # use_nvlamb=False: no trust ratio for the no-decay group (biases, norms, pos_embed, ...).
        torch._foreach_mul_(updates, lr)
    else:
        torch._foreach_add_(updates, params, alpha=weight_decay)
        w_norm, u_norm = _norms(params), _norms(updates)
        # `!= 0` rather than `> 0` as in apex, so a NaN norm propagates instead of being hidden by ratio 1.
        ratio = torch.where((w_norm != 0) & (u_norm != 0), w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(updates, list((ratio * lr).to(params[0].dtype).unbind(0)))
    torch._foreach_sub_(params, updates)
