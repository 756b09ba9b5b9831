"""GaLore with AdamW moments in the projected space (fp32).

The AdamW update is galore-torch's (Hugging Face AdamW form: ``denom = sqrt(v) + eps``, bias corrections folded
into the step size, weight decay applied after the update), so with a full SVD it reproduces galore-torch's
``GaLoreAdamW`` step for step; tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from megatron_pept.optim.galore.base import GaLoreOptimizer
from megatron_pept.optim.galore.views import _View


class GaLoreAdamW(GaLoreOptimizer):
    """GaLore with AdamW moments in the projected space (fp32)."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        param_names: Mapping[torch.Tensor, str] | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, param_names=param_names)

    def _init_inner_state(self, state: dict[str, Any], shape: torch.Size, like: torch.Tensor, group: dict) -> None:
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=like.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=like.device)

    def _adam_direction(
        self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, group: dict, step: float
    ) -> tuple[torch.Tensor, float]:
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return exp_avg / denom, step_size

    def _inner_update(self, state: dict[str, Any], grad: torch.Tensor, group: dict, param: _View) -> tuple:
        return self._adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group, float(state["step"]))
