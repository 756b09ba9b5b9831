"""Partial resets of optimizer state (ReLoRA's restarts): magnitude pruning, random pruning, full reset.

Pure functions on tensors plus one helper that applies them to the per-parameter state of an Adam-family
optimizer. Scalar entries (the step counter) are left alone, so Adam's bias correction keeps counting.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

RESET_MODES = ("magnitude", "random", "full", "none")


@torch.no_grad()
def prune_smallest_(t: torch.Tensor, *, ratio: float) -> int:
    """Zero, in place, the ``round(ratio * numel)`` entries of smallest magnitude; returns how many."""
    k = int(round(ratio * t.numel()))
    if k <= 0:
        return 0
    flat = t.view(-1)
    if k >= flat.numel():
        flat.zero_()
        return flat.numel()
    idx = torch.topk(flat.abs().float(), k, largest=False, sorted=False).indices
    flat[idx] = 0
    return k


@torch.no_grad()
def prune_random_(t: torch.Tensor, *, ratio: float, generator: torch.Generator | None = None) -> int:
    """Zero, in place, ``round(ratio * numel)`` entries chosen uniformly at random; returns how many."""
    k = int(round(ratio * t.numel()))
    if k <= 0:
        return 0
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=generator, device="cpu")[:k].to(flat.device)
    flat[idx] = 0
    return k


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    *,
    mode: str,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Reset the moment tensors of ``params`` in ``optimizer``: ``magnitude`` / ``random`` zero a ``ratio`` of
    each tensor's entries, ``full`` zeroes them all, ``none`` does nothing. Returns (entries zeroed, entries)."""
    if mode not in RESET_MODES:
        raise ValueError(f"unknown optimizer reset {mode!r}; choose one of {', '.join(RESET_MODES)}")
    zeroed = total = 0
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if not torch.is_tensor(value) or value.numel() <= 1:
                continue  # the step counter
            total += value.numel()
            if mode == "full":
                value.zero_()
                zeroed += value.numel()
            elif mode == "magnitude":
                zeroed += prune_smallest_(value, ratio=ratio)
            elif mode == "random":
                zeroed += prune_random_(value, ratio=ratio, generator=generator)
    return zeroed, total
