"""The evaluation loop: top-1 / top-5 of a model over every sample of a loader, counted once across ranks. The
trainer's per-epoch evaluation and the `eval` command (evalsets.py, which says how each named set is scored) both
run it.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.progress import Progress

from . import distributed as dist
from .device import autocast


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    amp: str,
    progress: Progress | None = None,
    mask: torch.Tensor | None = None,
    keep: bool = False,
) -> dict:
    """Top-1/top-5 (%) over every sample of `loader`'s set, counted once across ranks. `mask` (bool, one per class)
    scores over those classes only (ImageNet-A/-R); `keep` also returns each sample's index, label, top-5 and their
    softmax probabilities (over the scored classes), in sample order, gathered from every rank."""
    model.eval()
    correct1 = correct5 = n = 0
    kept = []
    task = progress.add_task("eval", total=len(loader), info="") if progress else None
    device = next(model.parameters()).device
    masked_out = None if mask is None else ~mask.to(device)
    for x, y in loader:
        with autocast(x.device, amp):
            logits = model(x)
        logits = logits.float()
        if masked_out is not None:
            logits = logits.masked_fill(masked_out, float("-inf"))
        scores, top5 = logits.topk(min(5, logits.shape[-1]), dim=-1)
        hit = top5 == y[:, None]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=-1).sum()
        n += len(y)
        if keep:
            # log-sum-exp over the scored classes (masked logits are -inf): the top-5's softmax probabilities
            prob = (scores - logits.logsumexp(dim=-1, keepdim=True)).exp()
            kept.append((y.cpu(), top5.cpu(), prob.cpu()))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    # Each rank saw its own unpadded shard: summing the counts gives every sample exactly once.
    sums = dist.all_reduce_sum(
        torch.tensor([float(correct1), float(correct5), float(n)], dtype=torch.float64, device=device)
    )
    c1, c5, n = sums.tolist()
    result = {"acc1": 100.0 * c1 / max(n, 1), "acc5": 100.0 * c5 / max(n, 1), "n": int(n)}
    if keep:
        labels = torch.cat([k[0] for k in kept]).numpy() if kept else np.zeros(0, np.int64)
        top5 = torch.cat([k[1] for k in kept]).numpy() if kept else np.zeros((0, 5), np.int64)
        prob = torch.cat([k[2] for k in kept]).numpy() if kept else np.zeros((0, 5), np.float32)
        index = loader.sample_indices(0)[: len(labels)]
        parts = dist.all_gather_object((index, labels, top5, prob))
        index, labels, top5, prob = (np.concatenate([p[i] for p in parts]) for i in range(4))
        order = np.argsort(index, kind="stable")
        result.update(index=index[order], label=labels[order], top5=top5[order], top5_prob=prob[order])
    return result
