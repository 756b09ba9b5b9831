"""The process-level collectives the trainer, the checkpoint code and the metrics use: every one is the identity
(or the obvious single-process answer) when no process group is up, so callers never test for one."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from megatron_pept.sharding import distributed


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the ranks (the sum is in place; the mean is a new tensor)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t


def any_rank(flag: bool, *, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any."""
    value = torch.tensor(1.0 if flag else 0.0)
    if distributed():
        value = value.to(device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def broadcast_object(value: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank: short strings and plain data (nothing is loaded from disk)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def first_error(error: str | None) -> str | None:
    """The first rank's error message, on every rank (None if no rank had one): lets all ranks stop together."""
    return next((e for e in all_gather_object(error) if e), None)


def new_gloo_group() -> Any:
    """A process group of every rank on gloo (e.g. for background checkpoint saves); None without a group."""
    return dist.new_group(backend="gloo") if distributed() else None


def init_process_group(*, backend: str, rank: int, world_size: int, timeout_minutes: int) -> None:
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def shutdown() -> None:
    if distributed():
        dist.destroy_process_group()
