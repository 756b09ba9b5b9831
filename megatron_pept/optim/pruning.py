"""Partial resets of optimizer state (ReLoRA's restarts): magnitude pruning, random pruning, full reset.

Pure functions on tensors plus one helper that applies them to the per-parameter state of an Adam-family
optimizer. Scalar entries (the step counter) are left alone, so Adam's bias correction keeps counting.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_pept.sharding import LOCAL_ACCESS, ParamAccess

RESET_MODES = ("magnitude", "magnitude_joint", "random", "full", "none")


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
def prune_joint_(first: torch.Tensor, second: torch.Tensor, *, ratio: float) -> int:
    """Zero the same ``round(ratio * numel)`` entries in both moments: those with the smallest second moment.

    Pruning each moment on its own can keep an entry's first moment while zeroing its second, and Adam then
    divides a surviving momentum by ``eps``; with one mask an entry keeps both or neither.
    """
    k = int(round(ratio * second.numel()))
    if k <= 0:
        return 0
    idx = torch.topk(second.reshape(-1).abs().float(), min(k, second.numel()), largest=False, sorted=False).indices
    first.view(-1)[idx] = 0
    second.view(-1)[idx] = 0
    return 2 * idx.numel()


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    *,
    mode: str,
    ratio: float,
    generator: torch.Generator | None = None,
    access: ParamAccess = LOCAL_ACCESS,
) -> tuple[int, int]:
    """Reset the moment tensors of ``params`` in ``optimizer``: ``magnitude`` / ``random`` zero a ``ratio`` of
    each tensor's entries, ``magnitude_joint`` the same entries of both moments, ``full`` all of them, ``none``
    nothing. Works on whole tensors (gathered from shards or partitions by ``access``), so the result does not
    depend on the layout. Returns (entries zeroed, entries)."""
    if mode not in RESET_MODES:
        raise ValueError(f"unknown optimizer reset {mode!r}; choose one of {', '.join(RESET_MODES)}")
    zeroed = total = 0
    for p in params:
        keys = access.state_keys(optimizer, p)
        if mode == "magnitude_joint" and "exp_avg" in keys and "exp_avg_sq" in keys:
            first = access.get_state(optimizer, p, "exp_avg").clone()
            second = access.get_state(optimizer, p, "exp_avg_sq").clone()
            total += first.numel() + second.numel()
            zeroed += prune_joint_(first, second, ratio=ratio)
            access.set_state(optimizer, p, "exp_avg", first)
            access.set_state(optimizer, p, "exp_avg_sq", second)
            continue
        for key in keys:
            whole = access.get_state(optimizer, p, key).clone()
            total += whole.numel()
            if mode == "full":
                whole.zero_()
                zeroed += whole.numel()
            elif mode in ("magnitude", "magnitude_joint"):
                zeroed += prune_smallest_(whole, ratio=ratio)
            elif mode == "random":
                zeroed += prune_random_(whole, ratio=ratio, generator=generator)
            access.set_state(optimizer, p, key, whole)
    return zeroed, total
