"""Gradient scaling from a projected optimizer state (APOLLO, Fira) and Fira's norm-growth limiter, as pure
functions.

Both methods keep Adam moments of a projected gradient ``R`` (``m x r`` for a right projection, ``r x n`` for a
left one; see :mod:`megatron_pept.optim.projector`) and use them only to measure how much Adam would rescale the
gradient: with ``U = m_t / (sqrt(v_t) + eps)`` the Adam direction in the projection, the factor of a channel (a
row of a right projection, a column of a left one: one per entry of the kept, larger dimension) is
``||U_channel|| / (||R_channel|| + 1e-8)``; APOLLO-Mini takes one factor for the whole tensor, ``||U|| / (||R|| +
1e-8)``. APOLLO multiplies the raw full gradient by it; Fira multiplies the part of the gradient the projection
misses. The ``1e-8`` is the reference packages' (apollo-torch, fira).

Sharded (FSDP2 rows, ZeRO fragments), a channel is never split across ranks (a right projection's rows are whole on
the rank that holds them, a left projection's columns are whole on every rank), but a tensor may be: the per-tensor
factor and the limiter's norm are then made from squared norms summed over the ranks
(:func:`tensor_factor_from_squares`, ``limit_norm_growth(..., norm=)``).
"""

from __future__ import annotations

import torch

SCALE_TYPES = ("channel", "tensor")


def scaling_factor(update_low: torch.Tensor, grad_low: torch.Tensor, *, side: str, scale_type: str) -> torch.Tensor:
    """The factor, shaped to broadcast over the full ``m x n`` gradient: ``m x 1`` (right projection, per row),
    ``n`` (left projection, per column) or a 0-d tensor (``scale_type="tensor"``)."""
    if scale_type == "tensor":
        return torch.linalg.vector_norm(update_low) / (torch.linalg.vector_norm(grad_low) + 1e-8)
    if scale_type != "channel":
        raise ValueError(f"scale_type must be one of {', '.join(SCALE_TYPES)}; got {scale_type!r}")
    dim = 1 if side == "right" else 0  # the projected (rank) dimension: norms over it leave one value per channel
    factor = torch.linalg.vector_norm(update_low, dim=dim) / (torch.linalg.vector_norm(grad_low, dim=dim) + 1e-8)
    return factor.unsqueeze(1) if side == "right" else factor


def tensor_factor_from_squares(update_sq: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """The per-tensor factor ``||U|| / (||R|| + 1e-8)`` from the squared norms ``||U||^2`` and ``||R||^2`` (summed
    over the ranks that hold parts of ``U`` and ``R``)."""
    return update_sq.sqrt() / (grad_sq.sqrt() + 1e-8)


def limit_norm_growth(
    update: torch.Tensor, previous_norm: torch.Tensor, *, gamma: float, norm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter: if ``||update||`` grew by more than ``gamma`` times over the last (limited)
    norm, scale it down to exactly ``gamma`` times that norm. Returns the limited update, its norm (to pass as
    ``previous_norm`` next step) and whether it was limited (a bool tensor: no host synchronisation). The ratio
    is computed as the packages do, ``||update|| / (previous + 1e-8)``, so the results agree bit for bit. ``norm``:
    the norm of the whole update when ``update`` is only this rank's part of it (computed from ``update`` if None)."""
    norm = torch.linalg.vector_norm(update) if norm is None else norm
    ratio = norm / (previous_norm + 1e-8)
    limiter = ratio.clamp(min=gamma) / gamma  # exactly 1.0 below the threshold: the update is left as it is
    return update / limiter, norm / limiter, ratio > gamma
