"""Initial values of a parameter from a seed of its own, in pieces that do not depend on who draws them.

A parameter's values are a function of ``train.seed``, its Hugging Face-style name and its shape only, drawn by
row blocks (:mod:`megatron_pept.seeded`): a rank that holds rows ``[start, stop)`` of a parameter (an FSDP2 row
shard) draws only the blocks those rows touch and gets exactly the rows one process holding the whole tensor gets;
the weights are the same on one process, on DDP replicas and on FSDP2 shards, and nothing is ever drawn whole.

Where a tensor lives is given by a ``rows_of`` function (``tensor -> (the local tensor, its first row in the whole
tensor)``): :func:`whole_rows` for plain tensors; the FSDP2 backend's row shards are read by
:func:`megatron_pept.sharding.local_rows`. This module knows nothing of the distributed stack.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_pept.seeded import draw_rows

RowsOf = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""``tensor -> (the part of it this process holds, as a plain tensor of whole rows; the index of its first row)``."""


def whole_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A plain tensor: this process holds all of it."""
    return t, 0


@torch.no_grad()
def fill_normal_rows_(
    local: torch.Tensor,
    *,
    start: int,
    shape: torch.Size | tuple[int, ...],
    name: str,
    seed: int,
    std: float,
) -> None:
    """Fill ``local`` (rows ``[start, start + len(local))`` of parameter ``name`` of whole ``shape``) with its
    N(0, std) initial values: the same rows whatever else the process holds. Drawn in fp32, then stored in
    ``local``'s dtype."""

    def normal(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        values = torch.empty(size, dtype=torch.float32, device=local.device)
        return values.normal_(mean=0.0, std=std, generator=generator)

    rows = local.shape[0] if local.dim() else 1
    values = draw_rows(
        start=start, rows=rows, shape=shape, name=name, seed=seed, purpose="init", draw=normal, device=local.device
    )
    if rows:
        local.copy_(values.reshape(local.shape))


def seed_from(generator: torch.Generator) -> int:
    """A run seed drawn from ``generator`` (for callers that still pass one to ``init_weights``)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


__all__ = ["RowsOf", "fill_normal_rows_", "seed_from", "whole_rows"]
