"""AdamW with moments stored in a lower precision (bf16), the math done in fp32.

torch.optim.AdamW keeps its moments in the parameter's dtype; this one keeps fp32 master weights but bf16
moments, halving optimizer memory, as in the bf16 baselines of the Approximations paper. With fp32 moments it
computes exactly what torch's single-tensor AdamW computes (a test holds it to that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from megatron_pept import sharding
from megatron_pept.optim.weight_update import WeightUpdate
from megatron_pept.sharding import ShardAwareOptimizer, ZeroLayout, keeps_on_host, local_rows


class KeepStateDtypes:
    """Mixin for optimizers whose state dtypes differ from their parameters'.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to the parameter's dtype,
    which would turn bf16 moments into fp32, 8-bit codes into floats and integer counters and seeds into float32.
    This keeps each tensor's saved dtype and only moves it to the parameter's device, except the host counters
    (:data:`~megatron_pept.sharding.HOST_STATE_KEYS`), which stay on the host.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]  # type: ignore[attr-defined]
        by_id = dict(zip(ids, params))
        for param_id, saved in state_dict["state"].items():
            param = by_id[param_id]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    device = "cpu" if keeps_on_host(key, value.shape) else param.device
                    self.state[param][key] = value.to(device=device, copy=True)  # type: ignore[attr-defined]


class LowPrecisionAdamW(KeepStateDtypes, torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype

    def _init_state(self, state: dict[str, Any], p: torch.Tensor) -> None:
        """A parameter's first state: the step count (on the host) and both moments, shaped like it (a DTensor's
        moments are DTensors of its layout) in :attr:`state_dtype`."""
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(state, p)
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float()
                exp_avg_sq = state["exp_avg_sq"].float()
                if wd:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = math.sqrt(1 - beta2**step)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                if p.dtype == torch.float32:
                    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                else:
                    p.add_((exp_avg / denom).to(p.dtype), alpha=-lr / bias_correction1)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss


def debiased_beta(beta: float, step: int) -> float:
    """``beta * (1 - beta^(t-1)) / (1 - beta^t)``: the moving average's weight on its past that makes the
    average its own bias-corrected estimate (torch-optimi's form of Adam; 0 at the first step)."""
    return (beta**step - beta) / (beta**step - 1)


class LowPrecisionWeightAdamW(ShardAwareOptimizer, LowPrecisionAdamW):
    """AdamW for weights held in bf16 with no fp32 copy (``train.param_dtype=bf16``): each step's fp32 update,
    weight decay included, reaches the weight through ``weight_update`` (stochastic rounding, Kahan summation or
    round-to-nearest; :mod:`megatron_pept.optim.weight_update`).

    The arithmetic is torch-optimi 0.3.3's AdamW: moments that are their own bias-corrected estimates (debiased
    betas, :func:`debiased_beta`), computed in the moments' dtype (``state_dtype``: fp32, or bf16 as torch-optimi
    keeps them for bf16 weights), the update ``-lr * m / (sqrt(v) + eps)``. With bf16 moments and no weight decay it
    computes what ``optimi.AdamW`` computes bit for bit, in Kahan mode and in plain rounding (a test holds it to
    that). One departure: torch-optimi multiplies the bf16 weight by ``1 - lr * wd`` in place, which rounds a
    decay below half a bf16 step away; here the decay is part of the update, so it is compensated or rounded
    stochastically like the rest.

    Under FSDP2 each rank steps its own rows of each weight (the parameter's local shard), and the rounding bits are
    those of the rows it holds. Under DeepSpeed ZeRO (``bf16.bf16_master_weights_and_grads``) it steps the bf16 flat
    partitions as they are, its state kept per partition as torch's AdamW's is, and each piece of a weight in a
    partition is rounded with that weight's bits (:meth:`WeightUpdate.add_flat_`)."""

    flat_pieces: ZeroLayout | None = None
    """Under ZeRO: the weights each flat partition holds pieces of (their names seed the rounding bits). Not
    :attr:`zero_layout`, which would declare the state per model parameter."""

    weight_update: WeightUpdate | None = None
    """How updates reach the bf16 weights (set by the trainer, :func:`attach_weight_update`)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        weight_update: WeightUpdate | None = None,
        state_dtype: torch.dtype = torch.float32,
        **hyper: Any,
    ) -> None:
        """``hyper``: ``lr``, ``betas``, ``eps``, ``weight_decay``, as :class:`LowPrecisionAdamW` takes them."""
        super().__init__(params, state_dtype=state_dtype, **hyper)
        if weight_update is not None:
            self.weight_update = weight_update

    def attach_zero(self, layout: ZeroLayout) -> None:
        self.flat_pieces = layout

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                local, start = local_rows(p)
                if self.weight_update is None:
                    raise RuntimeError("LowPrecisionWeightAdamW steps bf16 weights: give it a weight_update")
                if not state:
                    self._init_state(state, p)
                    self.weight_update.init_state(state, local, like=p)
                state["step"] += 1
                step = int(state["step"])
                exp_avg, exp_avg_sq = sharding.local(state["exp_avg"]), sharding.local(state["exp_avg_sq"])
                grad = sharding.local(p.grad).to(exp_avg.dtype)
                exp_avg.lerp_(grad, 1 - debiased_beta(beta1, step))
                beta2_hat = debiased_beta(beta2, step)
                exp_avg_sq.mul_(beta2_hat).addcmul_(grad, grad, value=1 - beta2_hat)
                denom = exp_avg_sq.sqrt().add_(eps)
                delta = (exp_avg.float() * -lr).div_(denom.float())  # out of place: exp_avg may be fp32 itself
                if wd:
                    delta.add_(local.float(), alpha=-lr * wd)
                if self.flat_pieces is not None and id(p) in self.flat_pieces:
                    self.weight_update.add_flat_(p, state, delta, self.flat_pieces[id(p)])
                else:
                    self.weight_update.add_(p, local, state, delta, start=start, shape=p.shape)
        return loss
