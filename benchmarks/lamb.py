"""LAMB step time on ViT-B's parameters: ours (multi-tensor, eager and torch.compile'd) vs timm's `Lamb`.

Both optimise the same 86.6M parameters in DeiT III's two groups (decay / no decay) with global clipping at 1.0, as
the recipe does; gradients are fixed random tensors, so only the optimiser runs. On CUDA every timing is bracketed
by synchronisations; the median over --steps steps is reported after warm-up (compilation excluded, and reported).
Goals (issue 7): >= 2x timm on CPU, >= 5x on GPU.

    python benchmarks/lamb.py                  # CUDA if available, else CPU
    python benchmarks/lamb.py --device cpu --steps 5
    python benchmarks/lamb.py --no-compile --json lamb.json   # eager only (no cold compilation), numbers to a file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def time_steps(opt, steps: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit3_base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on CUDA, 5 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd LAMB")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (50 if device.type == "cuda" else 5)

    from timm.optim import Lamb as TimmLamb

    from deit3_fast.lamb import Lamb
    from deit3_fast.models import create_model
    from deit3_fast.optim import param_groups_weight_decay

    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 1e-2
    hp = dict(lr=4e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, max_grad_norm=1.0)
    candidates = {
        # timm's Lamb with the options that give apex FusedLAMB's maths (global clip, trust ratio on decay only).
        "timm Lamb": lambda g: TimmLamb(g, **hp, trust_clip=False, always_adapt=False),
        "ours (eager)": lambda g: Lamb(g, **hp),
        "ours (compiled)": lambda g: Lamb(g, **hp, compile=True),
    }
    if args.no_compile:
        del candidates["ours (compiled)"]
    step_s, first_s = {}, {}
    for name, make in candidates.items():
        opt = make(param_groups_weight_decay(model, hp["weight_decay"]))
        t = time.perf_counter()
        opt.step()  # creates the state; for the compiled one, compiles
        opt.step()
        first_s[name] = round(time.perf_counter() - t, 2)
        step_s[name] = time_steps(opt, steps, device)
        print(f"{name:16s} {step_s[name] * 1e3:9.2f} ms/step   (first two steps {first_s[name]} s)", flush=True)
        del opt
    base = step_s["timm Lamb"]
    result = {
        "model": args.model,
        "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 1),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} x{len(os.sched_getaffinity(0))} threads "
        f"{torch.get_num_threads()}",
        "steps": steps,
        "ms_per_step": {k: round(v * 1e3, 2) for k, v in step_s.items()},
        "first_two_steps_s": first_s,
        "speedup_vs_timm": {k: round(base / v, 2) for k, v in step_s.items() if k != "timm Lamb"},
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
