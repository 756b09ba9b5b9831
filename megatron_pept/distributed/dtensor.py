"""Small helpers that let the methods' math run on FSDP2's sharded parameters (DTensors) and on plain tensors
alike: gather the full value, compute on it, write the result back into each rank's shard."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered when sharded); a plain tensor is returned as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def assign_(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``value`` is the full tensor and ``target`` may be a shard of it.

    Every rank holds the same ``value``, so each keeps its own slice without communication.
    """
    value = value.to(dtype=target.dtype, device=target.device)
    if isinstance(target, DTensor):
        local = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(value)
