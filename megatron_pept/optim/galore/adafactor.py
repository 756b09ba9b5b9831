"""GaLore with Adafactor in the projected space (factored second moments)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from megatron_pept.optim.galore.base import GaLoreOptimizer
from megatron_pept.optim.galore.views import _View, _ZeroView


class GaLoreAdafactor(GaLoreOptimizer):
    """GaLore with Adafactor in the projected space: factored second moments (row and column means) for matrices,
    optional first moment (``beta1``), update clipping by RMS, the learning rate from the schedule (no relative
    step or parameter scaling unless asked), as transformers' and galore-torch's Adafactor."""

    elementwise_inner = False  # factored statistics need the whole projected gradient

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        beta1: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        scale_parameter: bool = False,
        relative_step: bool = False,
        param_names: Mapping[torch.Tensor, str] | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta1=beta1,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
        )
        super().__init__(params, defaults, param_names=param_names)

    def _init_inner_state(self, state: dict[str, Any], shape: torch.Size, like: torch.Tensor, group: dict) -> None:
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=like.device)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=like.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=like.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=like.device)

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    def _lr(self, group: dict, step: float, view: _View) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            lr = min(1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            value = view.value.float()
            rms = (view.sum_all(value.square().sum()) / view.shape.numel()).sqrt()
            lr *= max(group["eps"][1], float(rms))
        return lr

    def state_layout(self, p: torch.Tensor, key: str) -> str:
        # Under FSDP2 this optimizer keeps projected state and factored statistics whole on every rank, and
        # element-wise state per fragment (flattened rows): the latter reloads on the same number of ranks only.
        if key in ("step", "refreshes", "seed", "exp_avg_sq_row", "exp_avg_sq_col"):
            return "replicated"
        projected = "rank" in self.param_groups[self._group_index[id(p)]]
        return "replicated" if projected and key != "ef_residual" else "local"

    def _view_of(self, p: torch.Tensor) -> _View:
        # Factored statistics need whole rows and columns: an FSDP2 row shard is handled as a fragment, with the
        # projected gradient made whole on every rank (one all-reduce of the low-rank size per matrix).
        return _ZeroView.of_row_shard(p) if isinstance(p, DTensor) else _View(p)

    def _plain_step(self, p: torch.Tensor, group: dict, view: _View) -> None:
        if isinstance(view, _ZeroView):
            return self._fragment_step(p, group, view)
        return super()._plain_step(p, group, view)

    def _fragment_step(self, p: torch.Tensor, group: dict, view: _ZeroView) -> None:
        """The unprojected update of a tensor this rank holds a ZeRO fragment of: for a matrix, the row and column
        sums of the squared gradient are summed over the ranks (factored second moment); for any tensor, so is
        the update's sum of squares (RMS clipping). The step equals the whole-tensor one."""
        f = view.frag
        param, grad = view.param(p), view.grad(p).float()
        factored = len(view.shape) == 2
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            self._init_inner_state(state, view.shape if factored else grad.shape, grad, group)
            if "exp_avg" in state:
                state["exp_avg"] = torch.zeros_like(grad)  # element-wise: kept per fragment
        state["step"] += 1
        step = float(state["step"])
        lr = self._lr(group, step, view.with_param(param))
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        squared = grad.square() + group["eps"][0]
        if factored:
            m, n = view.shape
            index = f.indices(grad.device)
            rows, cols = index // n, index % n
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(f.block_sums(squared, rows, m) / n, alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(f.block_sums(squared, cols, n) / m, alpha=1.0 - beta2t)
            update = (row / row.mean()).rsqrt()[rows] * col.rsqrt()[cols] * grad
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt() * grad
        rms = (f.all_reduce(update.square().sum()) / view.shape.numel()).sqrt()
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = state["exp_avg"].clone()
        self._apply(p, param, state, update, lr, group, view)  # bf16 weights: rounded by optim.weight_update

    def _inner_update(self, state: dict[str, Any], grad: torch.Tensor, group: dict, param: _View) -> tuple:
        step = float(state["step"])
        lr = self._lr(group, step, param)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        squared = grad.square() + group["eps"][0]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = r_factor * col.unsqueeze(-2).rsqrt() * grad
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt() * grad
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = state["exp_avg"].clone()
        return update, lr

    def _decay(self, p: torch.Tensor, group: dict, step_size: float) -> None:
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["weight_decay"] * step_size)

    def _decay_rate(self, group: dict, step_size: float) -> float:
        return group["weight_decay"] * step_size if group["weight_decay"] > 0 else 0.0
