"""The training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits_bsv: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits_bsv.flatten(0, 1).float(), targets_bs.flatten(0, 1))


def per_window_loss(logits_bsv: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each window (row) of the batch, in fp32: shape ``(batch,)``."""
    per_token = F.cross_entropy(logits_bsv.flatten(0, 1).float(), targets_bs.flatten(0, 1), reduction="none")
    return per_token.view(targets_bs.shape).mean(dim=1)
