"""The part of a parameter a GaLore optimizer steps on this rank, and how projections and statistics over the whole
parameter are computed from it: the whole tensor (one process, DDP), an FSDP2 row shard, or a flat fragment (a
piece of a ZeRO partition, or an FSDP2 row shard seen as one). The arithmetic of shards and fragments lives in
:mod:`megatron_pept.sharding`; these views apply it to projections.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from megatron_pept.optim.projector import (
    divide_exactly,
    project,
    project_back,
    projected_shape,
    subspace_overlap_tensor,
)
from megatron_pept.sharding import FlatFragment, RowShard


class _View:
    """The part of a parameter this rank steps, and how projections and statistics over the whole parameter are
    computed from it. This base class is the whole parameter (one process, DDP)."""

    sharded = False  # other ranks hold other parts of the parameter

    start = 0  # the first row of the parameter this rank steps

    def __init__(self, p: torch.Tensor) -> None:
        self.shape = p.shape
        self.value: torch.Tensor | None = None  # set by with_param: this rank's part of the parameter

    def with_param(self, value: torch.Tensor) -> _View:
        self.value = value
        return self

    def param(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def grad(self, p: torch.Tensor) -> torch.Tensor:
        return p.grad

    def low_shape(self, grad: torch.Tensor, side: str, rank: int) -> torch.Size:
        return torch.Size((grad.shape[0], rank) if side == "right" else (rank, grad.shape[1]))

    def gather(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def local_basis(self, basis: torch.Tensor, side: str) -> torch.Tensor:
        return basis

    def overlap(self, old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
        """:func:`~megatron_pept.optim.projector.subspace_overlap` of the whole projectors, as a 0-d float64 tensor."""
        return subspace_overlap_tensor(old, new, side=side)

    def project(self, grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        return project(grad, basis, side=side)

    def back(self, low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        return project_back(low, basis, side=side)

    def sum_all(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # APOLLO / Fira: scaling the full-size gradient by a factor of the projected moments

    def low_split(self, side: str) -> bool:
        """The projected gradient and moments hold only this rank's rows (channels) of a right projection."""
        return False

    def owned_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of a row-split projected tensor (or per-row factor) that this rank counts in sums over the
        matrix: each row on exactly one rank."""
        return t

    def expand(self, factor: torch.Tensor, side: str) -> torch.Tensor:
        """A scaling factor (per row ``k x 1`` of a right projection, per column ``n`` of a left one, or 0-d) laid
        out to multiply this rank's gradient."""
        return factor


class _RowShard(_View):
    """This rank's rows of a parameter FSDP2 shards on dim 0 (:class:`~megatron_pept.sharding.RowShard`): a right
    projection is local to the rows; a left projection sums ``P_rows^T G_rows`` over the ranks; the projector of a
    left projection is kept by rows."""

    sharded = True

    def __init__(self, dt: DTensor) -> None:
        super().__init__(dt)
        self.rows = RowShard(dt)
        self.start = self.rows.start

    def param(self, p: torch.Tensor) -> torch.Tensor:
        return p.to_local()

    def grad(self, p: torch.Tensor) -> torch.Tensor:
        return p.grad.to_local()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return self.rows.gather(local)

    def local_basis(self, basis: torch.Tensor, side: str) -> torch.Tensor:
        # this rank's rows of m x r
        return basis[self.rows.start : self.rows.stop].contiguous() if side == "left" else basis

    def overlap(self, old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
        if side == "right":
            return subspace_overlap_tensor(old, new, side=side)
        product = self.sum_all(old.T.float() @ new.float())
        return divide_exactly(product.square().sum().double(), new.shape[1])

    def project(self, grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        low = project(grad, basis, side=side)
        return self.sum_all(low) if side == "left" else low

    def sum_all(self, t: torch.Tensor) -> torch.Tensor:
        return self.rows.all_reduce(t)

    def low_split(self, side: str) -> bool:
        return side == "right"  # m x r, kept by rows; a left projection's r x n is whole on every rank


class _ZeroView(_View):
    """A fragment (:class:`~megatron_pept.sharding.FlatFragment`) of a matrix: a piece of a ZeRO partition,
    or an FSDP2 row shard seen as one. The projected gradient is the sum over ranks of each fragment's zero-padded
    rows projected (one all-reduce of the low-rank size), the projector and the projected-space state are whole on
    every rank, and the update is computed for the fragment's elements only. ``flat``/``flat_grad``: the 1-D
    tensors the fragment's offset points into."""

    sharded = True

    def __init__(
        self, frag: FlatFragment, flat: torch.Tensor, flat_grad: torch.Tensor, *, row_local: bool = False
    ) -> None:
        self.shape, self.value = frag.shape, None
        self.frag, self.flat, self.flat_grad = frag, flat, flat_grad
        # Right projections with an element-wise inner optimizer (Adam): keep only this fragment's rows of the
        # projected gradient and moments; only rows cut by a partition boundary are completed across ranks.
        self.row_local = row_local

    def _rows_of_right(self, side: str) -> bool:
        return self.row_local and side == "right"

    @classmethod
    def of_row_shard(cls, p: DTensor) -> _ZeroView:
        return cls(RowShard(p).as_fragment(), p.to_local().view(-1), p.grad.to_local().reshape(-1))

    def param(self, p: torch.Tensor) -> torch.Tensor:
        return self.frag.view(self.flat)

    def grad(self, p: torch.Tensor) -> torch.Tensor:
        return self.frag.view(self.flat_grad)

    def low_shape(self, grad: torch.Tensor, side: str, rank: int) -> torch.Size:
        if self._rows_of_right(side):
            return torch.Size((self.frag.r1 - self.frag.r0, rank))
        return torch.Size(projected_shape(tuple(self.shape), rank=rank))

    def gather(self, grad: torch.Tensor) -> torch.Tensor:
        return self.frag.gather(grad)

    def project(self, grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        f = self.frag
        block = f.rows_block(grad)
        if self._rows_of_right(side):
            return f.complete_edge_rows(block @ basis.T)
        if side == "right":
            low = grad.new_zeros(self.shape[0], basis.shape[0])
            low[f.r0 : f.r1] = block @ basis.T
        else:
            low = basis[f.r0 : f.r1].T @ block
        return f.all_reduce(low.contiguous())

    def back(self, low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        f = self.frag
        if self._rows_of_right(side):
            return f.from_rows(low @ basis)
        rows = low[f.r0 : f.r1] @ basis if side == "right" else basis[f.r0 : f.r1] @ low
        return f.from_rows(rows)

    def sum_all(self, t: torch.Tensor) -> torch.Tensor:
        return self.frag.all_reduce(t)

    def low_split(self, side: str) -> bool:
        return self._rows_of_right(side)

    def owned_rows(self, t: torch.Tensor) -> torch.Tensor:
        # A row cut by the fragment's start is completed on both ranks: it counts on the rank holding its start.
        f = self.frag
        return t[1:] if f.numel and f.lo % f.cols else t

    def expand(self, factor: torch.Tensor, side: str) -> torch.Tensor:
        if factor.ndim == 0:
            return factor
        f = self.frag
        if side == "right" and not self.row_local:
            factor = factor[f.r0 : f.r1]  # m x 1, whole on every rank: this fragment's rows
        return f.from_rows(factor.expand(f.r1 - f.r0, f.cols))
