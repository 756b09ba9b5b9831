"""A rank's contiguous piece of a parameter, as DeepSpeed ZeRO partitions them, and the collectives that let
matrix-aware optimizers (GaLore, Adam-mini, Adafactor) work on such pieces.

ZeRO hands the client optimizer one flat fp32 tensor per parameter group (stages 1 and 2: a slice of the
concatenated group; stage 3: the concatenation of each parameter's own partition). Each model parameter then
owns a contiguous range ``[lo, hi)`` of its row-major flattening on this rank, possibly empty, possibly starting
or ending in the middle of a row. A :class:`FlatFragment` records that range, where it sits in the flat tensor,
and the data-parallel group, and offers the few operations the optimizers need:

* ``rows_block``: the fragment padded with zeros to whole rows ``[r0, r1)``, so a projection of the covered rows
  is an ordinary matmul, and the partial rows at the ends contribute partial sums that an all-reduce completes;
* ``from_rows``: the fragment's elements of a block of whole rows;
* ``gather``: the whole matrix from every rank's fragment (one all-reduce, used on GaLore refresh steps only);
* ``block_ids``: which block (row, column, head) each element belongs to, for statistics summed across ranks.

Every rank must call the collective operations for every parameter, in the same order, even where its fragment
is empty: the optimizers iterate the group's parameters in ZeRO's order on every rank.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist


class FlatFragment:
    def __init__(self, shape: torch.Size | tuple[int, ...], *, lo: int, numel: int, offset: int, group=None) -> None:
        self.shape = torch.Size(shape)
        self.lo, self.numel, self.offset, self.group = int(lo), int(numel), int(offset), group
        self.hi = self.lo + self.numel
        self.cols = self.shape[-1] if len(self.shape) >= 2 else max(1, self.shape.numel())
        self.r0 = self.lo // self.cols
        self.r1 = -(-self.hi // self.cols) if self.numel else self.r0

    def __repr__(self) -> str:
        return f"FlatFragment(shape={tuple(self.shape)}, lo={self.lo}, numel={self.numel}, offset={self.offset})"

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This fragment's elements inside the optimizer's flat tensor (a view: writes go to the flat tensor)."""
        return flat.narrow(0, self.offset, self.numel)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def rows_block(self, frag: torch.Tensor) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the matrix with this fragment's elements in place and zeros elsewhere."""
        block = frag.new_zeros((self.r1 - self.r0) * self.cols)
        start = self.lo - self.r0 * self.cols
        block[start : start + self.numel] = frag
        return block.view(self.r1 - self.r0, self.cols)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        start = self.lo - self.r0 * self.cols
        return rows.reshape(-1)[start : start + self.numel]

    def gather(self, frag: torch.Tensor) -> torch.Tensor:
        """The whole tensor (every rank contributes its fragment; one all-reduce of the full size)."""
        whole = frag.new_zeros(self.shape.numel())
        whole[self.lo : self.hi] = frag
        return self.all_reduce(whole).view(self.shape)

    def complete_edge_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` holds, for rows ``[r0, r1)``, sums over this fragment's elements only; rows that a partition
        boundary cuts (at most the first and the last) get the other ranks' partial sums added: one all-gather of
        two rows per rank. Every rank holding part of a cut row contributes it, so the sums are complete."""
        partial = []
        if self.numel:
            for r in sorted({self.r0, self.r1 - 1}):
                covered = min(self.hi, (r + 1) * self.cols) - max(self.lo, r * self.cols)
                if covered < self.cols:
                    partial.append(r)
        if not (dist.is_available() and dist.is_initialized()):
            return rows
        edges = torch.full((2, rows.shape[1] + 1), -1.0, dtype=torch.float64, device=rows.device)
        for slot, r in enumerate(partial):
            edges[slot, 0], edges[slot, 1:] = r, rows[r - self.r0].double()
        gathered = [torch.empty_like(edges) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, edges, group=self.group)
        table = torch.cat(gathered)  # (2 x ranks, 1 + width): row index (-1: none), partial sums
        for r in partial:
            rows[r - self.r0] = table[table[:, 0] == r, 1:].sum(dim=0).to(rows.dtype)
        return rows

    def indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.arange(self.lo, self.hi, device=device)

    def block_ids(self, block_numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The block of each element when the flattening is cut into consecutive blocks of ``block_numel``."""
        return self.indices(device) // block_numel

    def block_sums(self, values: torch.Tensor, ids: torch.Tensor, blocks: int) -> torch.Tensor:
        """Per-block sums of ``values`` (one per fragment element) over every rank."""
        sums = values.new_zeros(blocks)
        sums.index_add_(0, ids, values)
        return self.all_reduce(sums)


class ZeroStateDict:
    """Mixin for optimizers that, under ZeRO, keep their state per model parameter (not per flat partition):
    ``state_dict()`` (which DeepSpeed calls for its own checkpoint) then covers only the flat partitions in
    ``param_groups``; the per-parameter state is checkpointed by megatron_pept.checkpoint beside it."""

    _zero_layout: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        if self._zero_layout is None:
            return super().state_dict()  # type: ignore[misc]
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}  # type: ignore[attr-defined]
        kept = self.state  # type: ignore[has-type]
        self.state = defaultdict(dict, {k: v for k, v in kept.items() if id(k) in in_groups})
        try:
            return super().state_dict()  # type: ignore[misc]
        finally:
            self.state = kept
