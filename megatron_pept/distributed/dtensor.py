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


class ParamAccess:
    """Read and write whole parameters and their optimizer state, whatever holds them.

    The methods' restarts and resets go through this: plain tensors and FSDP2 DTensors are handled here;
    :class:`megatron_pept.distributed.deepspeed_backend.DeepSpeedAccess` reaches into DeepSpeed ZeRO's partitioned
    fp32 master weights and optimizer state.
    """

    def get(self, t: torch.Tensor) -> torch.Tensor:
        return full(t)

    def set(self, t: torch.Tensor, value: torch.Tensor) -> None:
        assign_(t, value)

    def get_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
        value = optimizer.state.get(p, {}).get(key)
        return full(value) if torch.is_tensor(value) else None

    def set_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
        assign_(optimizer.state[p][key], value)

    def state_keys(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[str]:
        """Keys of the per-element state tensors of ``p`` (not the step counter)."""
        return [k for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.numel() > 1]


LOCAL_ACCESS = ParamAccess()
