"""Validation: the mean loss over a run's fixed validation windows, the same on any number of ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_pept.distributed import comm
from megatron_pept.models.loss import per_window_loss


@torch.no_grad()
def validation_loss(
    model: Any,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """Mean loss over ``batches`` (inputs, targets, per-window weights; NaN when there are none). Each rank sums
    the per-window losses of its share, weighted to skip padding, and the sums are added over the ranks."""
    if not batches:
        return float("nan")
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # weighted loss, windows
    for inputs, targets, weights in batches:
        inputs, targets, weights = inputs.to(device), targets.to(device), weights.to(device)
        with autocast():
            logits = model(inputs)
        per_window = per_window_loss(logits, targets)
        sums += torch.stack([(per_window * weights).sum(), weights.sum()]).double()
    model.train()
    total, windows = comm.all_reduce_sum(sums).tolist()
    return total / windows
