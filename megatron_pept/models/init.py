"""Initial values of a parameter from a seed of its own, in pieces that do not depend on who draws them.

A parameter's values are a function of ``train.seed``, its Hugging Face-style name and its shape only: it is cut
into blocks of whole rows (:func:`rows_per_block`, from the shape alone) and each block is drawn from a generator
seeded with a stable hash of (seed, name, block) (:func:`block_seed`; hashlib, not Python's salted ``hash``). So
a rank that holds rows ``[start, stop)`` of a parameter (an FSDP2 row shard) draws only the blocks those rows
touch and gets exactly the rows one process holding the whole tensor gets; the weights are the same on one
process, on DDP replicas and on FSDP2 shards, and nothing is ever drawn whole. The values are drawn on the
device the parameter lives on (a CUDA run's draws differ from a CPU run's, as any CUDA and CPU generator's do).

Where a tensor lives is given by a ``rows_of`` function (``tensor -> (the local tensor, its first row in the whole
tensor)``): :func:`whole_rows` for plain tensors; the FSDP2 backend's row shards are read by
:func:`megatron_pept.sharding.local_rows`. This module knows nothing of the distributed stack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

RowsOf = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""``tensor -> (the part of it this process holds, as a plain tensor of whole rows; the index of its first row)``."""

BLOCK_NUMEL = 1 << 20
"""About how many values one generator draws (4 MB in fp32): the most a rank draws beyond its own rows."""


def whole_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A plain tensor: this process holds all of it."""
    return t, 0


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of block ``block`` of parameter ``name`` in a run seeded ``seed`` (63 bits, stable across
    processes, machines and Python versions)."""
    digest = hashlib.blake2b(f"megatron_pept/init/{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rows_per_block(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows per generator block of a parameter of ``shape`` (the last block may be shorter): a function of the
    shape alone, so every layout cuts a parameter into the same blocks."""
    row = 1
    for size in tuple(shape)[1:]:
        row *= size
    return max(1, BLOCK_NUMEL // max(1, row))


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
    stop = start + (local.shape[0] if local.dim() else 1)
    if stop <= start:
        return
    per = rows_per_block(shape)
    rows = shape[0] if len(shape) else 1
    view = local.reshape(stop - start, -1) if local.dim() else local.reshape(1, 1)
    for block in range(start // per, (stop - 1) // per + 1):
        lo, hi = block * per, min((block + 1) * per, rows)
        generator = torch.Generator(device=local.device).manual_seed(block_seed(seed, name, block))
        values = torch.empty((hi - lo, view.shape[1]), dtype=torch.float32, device=local.device)
        values.normal_(mean=0.0, std=std, generator=generator)
        a, b = max(lo, start), min(hi, stop)
        view[a - start : b - start].copy_(values[a - lo : b - lo])


def seed_from(generator: torch.Generator) -> int:
    """A run seed drawn from ``generator`` (for callers that still pass one to ``init_weights``)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


__all__ = [
    "BLOCK_NUMEL",
    "RowsOf",
    "block_seed",
    "fill_normal_rows_",
    "rows_per_block",
    "seed_from",
    "whole_rows",
]
