"""Random draws that belong to a tensor's positions, not to whoever draws them.

A draw for parameter ``name`` (initial values, the noise of a stochastic rounding) is cut into blocks of whole rows
(:func:`rows_per_block`, from the shape alone), and each block comes from a generator seeded with a stable hash
of (purpose, seed, name, block) (:func:`block_seed`; hashlib, not Python's salted ``hash``). A process that holds
rows ``[start, stop)`` of the tensor (an FSDP2 row shard) draws only the blocks those rows touch and gets exactly
the rows one process holding the whole tensor gets. So the values are the same on one process, on DDP replicas and
on FSDP2 shards, nothing is ever drawn whole, and nothing but the seed and a counter needs saving to draw them
again. The values are drawn on the device the tensor lives on (a CUDA run's draws differ from a CPU run's, as any
CUDA and CPU generators' do).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch._guards import active_fake_mode

BLOCK_NUMEL = 1 << 20
"""About how many values one generator draws (4 MB in fp32): the most a process draws beyond its own rows."""


def block_seed(seed: int, name: str, block: int, *, purpose: str = "init") -> int:
    """The generator seed of block ``block`` of tensor ``name`` in a run seeded ``seed``, for ``purpose`` (63 bits,
    stable across processes, machines and Python versions)."""
    digest = hashlib.blake2b(f"megatron_pept/{purpose}/{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rows_per_block(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows per generator block of a tensor of ``shape`` (the last block may be shorter): a function of the shape
    alone, so every layout cuts a tensor into the same blocks."""
    row = 1
    for size in tuple(shape)[1:]:
        row *= size
    return max(1, BLOCK_NUMEL // max(1, row))


Draw = Callable[[tuple[int, int], torch.Generator], torch.Tensor]
"""``(block shape as (rows, values per row), generator) -> the block's values``, drawn from that generator alone."""


def draw_rows(
    *,
    start: int,
    rows: int,
    shape: torch.Size | tuple[int, ...],
    name: str,
    seed: int,
    purpose: str,
    draw: Draw,
    device: torch.device | str,
) -> torch.Tensor:
    """Rows ``[start, start + rows)`` of tensor ``name``'s draw (whole ``shape``), as a ``(rows, values per row)``
    tensor: the same rows whatever part of the tensor the caller holds."""
    per = rows_per_block(shape)
    total = shape[0] if len(shape) else 1
    width = 1
    for size in tuple(shape)[1:]:
        width *= size
    stop = start + rows
    if rows > 0 and active_fake_mode() is not None:
        return _span_draw(start=start, stop=stop, per=per, total=total, width=width, draw=draw, device=device)
    pieces = []
    for block in range(start // per, (stop - 1) // per + 1) if rows > 0 else ():
        lo, hi = block * per, min((block + 1) * per, total)
        generator = torch.Generator(device=device).manual_seed(block_seed(seed, name, block, purpose=purpose))
        values = draw((hi - lo, width), generator)
        pieces.append(values[max(lo, start) - lo : min(hi, stop) - lo])
    if not pieces:  # no rows (an empty ZeRO fragment): an empty draw of the draw's own dtype
        return draw((0, width), torch.Generator(device=device))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _span_draw(*, start: int, stop: int, per: int, total: int, width: int, draw: Draw, device: Any) -> torch.Tensor:
    """Under fake tensors (the memory planner, :mod:`megatron_pept.plan`) no value is ever read: one draw over the
    blocks' span holds the bytes the blocks hold, and the result is a view of it (one block) or a copy (several, as
    ``torch.cat`` makes), so a plan counts what a run allocates with a few operations instead of one per block."""
    lo, hi = (start // per) * per, min(((stop - 1) // per + 1) * per, total)
    span = draw((hi - lo, width), torch.Generator(device=device))
    rows = span[start - lo : stop - lo]
    return rows if hi - lo <= per else rows.clone()


__all__ = ["BLOCK_NUMEL", "Draw", "block_seed", "draw_rows", "rows_per_block"]
