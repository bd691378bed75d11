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

Everything runs as `torch._foreach_*` ops over whole tensor lists, and the clip factor, trust ratios and step counts
stay on the device, so a step never waits for the GPU.

With fp16 autocast, torch.amp.GradScaler hands the step its scale and inf/NaN flag as device tensors
(`_step_supports_amp_scaling`, as for torch's fused Adam) instead of unscaling the gradients itself and reading the
flag back on the host before every step: the scale is folded into the clip divisor (no extra pass), and a step with
non-finite gradients leaves parameters, moments and step counts exactly as they were, selected on the device.
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
    same maths through torch.compile. Each group's step count is a 0-d float32 tensor on its parameters' device.
    """

    # torch.amp.GradScaler.step then sets `grad_scale` and `found_inf` on the optimiser for the call and leaves the
    # skipping to it, instead of its fallback, which reads found_inf on the host (a wait for the backward pass).
    _step_supports_amp_scaling = True

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

    def _divisor(self, buckets: list[dict], grad_scale: torch.Tensor | None) -> torch.Tensor | None:
        """What every gradient is divided by, as a device tensor (no sync): the GradScaler's scale (None: unscaled
        gradients) times the clip factor, `global_norm / max_grad_norm` where the unscaled global norm exceeds it,
        else 1. None where there is nothing to divide by."""
        max_norm = self.defaults["max_grad_norm"]
        per_bucket = [_norms(gs) for b in buckets for _, gs, _, _ in b.values()] if max_norm > 0.0 else []
        if not per_bucket:
            return grad_scale
        dev = per_bucket[0].device
        acc = torch.float64 if any(n.dtype == torch.float64 for n in per_bucket) else torch.float32
        global_norm = torch.linalg.vector_norm(torch.cat([n.to(dev, acc) for n in per_bucket]))
        if grad_scale is None:
            return torch.where(global_norm > max_norm, global_norm / max_norm, torch.ones_like(global_norm))
        # GradScaler's scales are powers of two, so `/ scale` and `* scale` are exact: the divisor is the unscaled
        # step's clip factor times the scale, and the step computes what it would on unscaled gradients.
        scale = grad_scale.to(dev, acc)
        norm = global_norm / scale
        return torch.where(norm > max_norm, norm / max_norm, torch.ones_like(norm)) * scale

    def _step_count(self, group: dict) -> torch.Tensor:
        """The group's step count as a 0-d tensor on its parameters' device, which a skipped step leaves unchanged
        without the host knowing. Converted once: an int from a checkpoint written before counts were tensors, or
        a tensor that a checkpoint loaded onto the CPU."""
        dev = group["params"][0].device
        t = group.get("step", 0)
        if not isinstance(t, torch.Tensor):
            t = torch.full((), float(t), dtype=torch.float32, device=dev)
        elif t.device != dev or t.dtype != torch.float32:
            t = t.to(dev, torch.float32)
        group["step"] = t
        return t

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        """One step. `grad_scale`: the scale the gradients carry (None: unscaled); `found_inf`: non-zero where they
        hold an inf or NaN, and then nothing changes (parameters, moments, step counts). Both are device tensors,
        never read on the host; torch.amp.GradScaler.step passes them as the attributes of the same names."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None) if grad_scale is None else grad_scale
        found_inf = getattr(self, "found_inf", None) if found_inf is None else found_inf

        buckets = [self._buckets(group) for group in self.param_groups]
        if grad_scale is not None and any(dtype == torch.float16 for b in buckets for _, dtype in b):
            # The scale (2^16 at first) is past fp16's range, so it cannot be folded into an fp16 divisor; torch's
            # GradScaler refuses to unscale fp16 gradients too (autocast keeps fp32 parameters).
            raise ValueError("Lamb with a grad scaler needs fp32 or bf16 parameters, not fp16")
        divisor = self._divisor(buckets, grad_scale)
        skip = None if found_inf is None else found_inf != 0

        for group, group_buckets in zip(self.param_groups, buckets):
            if not group["params"]:
                continue
            # apex counts steps per group and advances every group, even one without gradients this step.
            count = self._step_count(group)
            group_skip = None if skip is None else skip.to(count.device)
            beta1, beta2 = group["betas"]
            bc1: float | torch.Tensor = 1.0
            bc2: float | torch.Tensor = 1.0
            if group["bias_correction"]:
                # From the count this step would reach, skipped or not (a skipped first step must not divide by
                # 1 - beta^0 = 0); in float64 like apex's host-side pow, then rounded to the parameters' dtype.
                t = count.to(torch.float64) + 1
                bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            for params, grads, exp_avgs, exp_avg_sqs in group_buckets.values():
                dev, dtype = params[0].device, params[0].dtype
                div = divisor.to(dev, dtype) if divisor is not None else torch.ones((), device=dev, dtype=dtype)
                scalars = tuple(
                    v.to(dev, dtype)
                    if isinstance(v, torch.Tensor)
                    # As tensors when compiled, so a new learning rate is new data, not a recompilation. Filled on
                    # the device: torch.tensor(v, device=cuda) would be a blocking copy, one per bucket per step.
                    else torch.full((), v, device=dev, dtype=dtype)
                    if self._compiled is not None
                    else v
                    for v in (group["lr"], bc1, bc2)
                )
                update = self._compiled or _lamb_update
                update(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    div,
                    *scalars,
                    None if group_skip is None else group_skip.to(dev),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
            count.add_(1 if group_skip is None else (~group_skip).to(count.dtype))
        return loss


def _lamb_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    divisor,
    lr,
    bc1,
    bc2,
    skip,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One LAMB step for same-device, same-dtype tensor lists. `divisor` divides the gradients (into a copy, not
    in-place: the caller may still read .grad); lr, bc1, bc2 are numbers or 0-d tensors; `skip` (a 0-d bool
    tensor, or None) set leaves every tensor as it was."""
    scaled = torch._foreach_div(grads, divisor)
    if skip is None:
        torch._foreach_lerp_(exp_avgs, scaled, 1.0 - beta1)  # m = beta1 m + (1 - beta1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
    else:
        # A skipped step's gradients hold inf/NaN, which no arithmetic mask removes (0 * inf = NaN): zero them with
        # a select (one pass over our copy), then decay by 1 instead of beta, so m and v stay bit-identical, and
        # apply the update at lr 0 (the update itself is finite: it comes from the unchanged moments).
        for g in scaled:
            g.masked_fill_(skip, 0.0)
        one = torch.ones((), device=skip.device, dtype=params[0].dtype)
        torch._foreach_mul_(exp_avgs, torch.where(skip, one, beta1))
        torch._foreach_add_(exp_avgs, scaled, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, torch.where(skip, one, beta2))
        lr = torch.where(skip, torch.zeros_like(one), lr)
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
