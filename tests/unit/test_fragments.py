"""ZeRO fragments: projections computed piecewise from arbitrary cuts of a matrix's flattening, summed as the
all-reduce would sum them, equal the whole-matrix projection (no process group: each piece is computed alone)."""

from __future__ import annotations

import pytest
import torch

from megatron_pept.optim.galore import _ZeroView
from megatron_pept.optim.projector import project, project_back, projection_side, svd_basis
from megatron_pept.sharding import FlatFragment


def pieces(shape: tuple[int, int], cuts: list[int], grad: torch.Tensor) -> list[_ZeroView]:
    """Cut the flattening at ``cuts``; each piece sits at offset 3 of its own flat buffer (as inside a ZeRO
    partition holding other parameters too)."""
    bounds = [0, *cuts, grad.numel()]
    views = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        flat = torch.zeros(3 + (hi - lo) + 2)
        flat.grad = torch.zeros_like(flat)
        frag = FlatFragment(shape, lo=lo, numel=hi - lo, offset=3)
        frag.view(flat.grad).copy_(grad.reshape(-1)[lo:hi])
        views.append(_ZeroView(frag, flat, flat.grad))
    return views


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
@pytest.mark.parametrize("cuts", [[], [17], [3, 4, 29, 41], [0, 30, 30]])  # mid-row cuts and empty pieces
def test_fragment_projection_sums_to_the_whole(shape: tuple[int, int], cuts: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=gen)
    side = projection_side(shape)
    basis = svd_basis(torch.randn(shape, generator=gen), rank=3, side=side)
    views = pieces(shape, cuts, grad)
    low = sum(v.project(v.grad(None), basis, side) for v in views)
    torch.testing.assert_close(low, project(grad, basis, side=side), rtol=1e-5, atol=1e-6)
    whole_back = project_back(low, basis, side=side).reshape(-1)
    torch.testing.assert_close(torch.cat([v.back(low, basis, side) for v in views]), whole_back)
    torch.testing.assert_close(sum(v.gather(v.grad(None)) for v in views), grad)
    assert sum(v.frag.numel for v in views) == grad.numel()


def test_fragment_block_ids_and_views() -> None:
    frag = FlatFragment((4, 6), lo=5, numel=9, offset=2)
    assert (frag.r0, frag.r1) == (0, 3)  # elements 5..13 touch rows 0, 1 and 2
    assert frag.block_ids(6).tolist() == [0, 1, 1, 1, 1, 1, 1, 2, 2]
    flat = torch.arange(20.0)
    assert frag.view(flat).tolist() == list(range(2, 11))
    frag.view(flat).zero_()
    assert flat[2:11].sum() == 0  # a view: writes reach the flat tensor
    sums = frag.block_sums(torch.ones(9), frag.block_ids(6), 4)
    assert sums.tolist() == [1.0, 6.0, 2.0, 0.0]


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
@pytest.mark.parametrize("cuts", [[], [17], [3, 4, 29, 41], [0, 30, 30]])
def test_fragment_scaling_factors_reassemble_and_count_each_row_once(shape: tuple[int, int], cuts: list[int]) -> None:
    """APOLLO / Fira under ZeRO: a factor per row of a right projection (from row-local moments: a row cut by a
    boundary is held whole by both pieces) or per column of a left one, laid out on each piece's elements,
    reassembles the whole matrix's broadcast factor; the rows each piece counts in sums over the matrix (the
    per-tensor factor, the logged mean) cover every row exactly once."""
    m, n = shape
    per_row, per_col = torch.arange(1.0, m + 1).unsqueeze(1), torch.arange(1.0, n + 1)
    whole_rows, whole_cols = per_row.expand(m, n).reshape(-1), per_col.expand(m, n).reshape(-1)
    views = pieces(shape, cuts, torch.zeros(shape))
    for view in views:
        view.row_local = True
    held = [per_row[v.frag.r0 : v.frag.r1] for v in views]
    assert torch.equal(torch.cat([v.owned_rows(rows) for v, rows in zip(views, held, strict=True)]), per_row)
    assert torch.equal(torch.cat([v.expand(rows, "right") for v, rows in zip(views, held, strict=True)]), whole_rows)
    assert torch.equal(torch.cat([v.expand(per_col, "left") for v in views]), whole_cols)
    for view in views:  # a right projection kept whole on every rank (non-element-wise inner optimizers)
        view.row_local = False
    assert torch.equal(torch.cat([v.expand(per_row, "right") for v in views]), whole_rows)
    assert all(v.expand(torch.tensor(2.0), "right").ndim == 0 for v in views)  # per tensor: a scalar
