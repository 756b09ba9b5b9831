"""Adam-mini (Zhang et al. 2024): Adam with one second-moment value per block of parameters.

The partition (chosen by the method, :class:`megatron_pept.methods.galore.AdamMiniMethod`): queries and keys get
one value per attention head, the embedding and the output layer keep full Adam (one value per entry), values,
attention outputs and MLP matrices one value per output neuron (row; the adam-mini package's partition) or per
tensor (as the Approximations paper describes Adam-mini), and any other tensor (norm weights) one value for the whole
tensor. Each parameter group carries its ``block`` kind (``adam``, ``head``, ``row`` or ``tensor``) and, for heads,
``head_numel``.

The update for a block ``B`` with gradient entries ``g``: ``m <- beta1 m + (1 - beta1) g`` per entry,
``v_B <- beta2 v_B + (1 - beta2) mean(g^2 over B)``, ``p <- p (1 - lr wd) - lr m / (1 - beta1^t) /
(sqrt(v_B / (1 - beta2^t)) + eps)``: the adam-mini package's arithmetic, step for step (tested).

Under data parallelism each rank holds the whole gradient (DDP), so block means are local; ``reduce_sum`` lets a
sharded run sum the partial sums of blocks that span shards before dividing by the block's global size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from megatron_pept.optim.sharded import ShardedOptimizer
from megatron_pept.optim.weight_update import WeightUpdate
from megatron_pept.sharding import FlatFragment, RowShard, ZeroLayout

BLOCK_KINDS = ("adam", "head", "row", "tensor")


class AdamMini(ShardedOptimizer, torch.optim.Optimizer):
    weight_update: WeightUpdate | None = None
    """How updates reach bf16 weights (``train.param_dtype=bf16``; set by the trainer); None: fp32 weights."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block="adam"))
        for group in self.param_groups:
            if group["block"] not in BLOCK_KINDS:
                raise ValueError(f"unknown Adam-mini block kind {group['block']!r}")
            if group["block"] == "head" and not group.get("head_numel"):
                raise ValueError("an Adam-mini 'head' group needs head_numel")
        self.reduce_sum = reduce_sum
        # Element counts of per-tensor blocks as device tensors, made once (per-layer optimizers share the dict):
        # torch.tensor(n, device=cuda) on every step would be a host-to-device copy that waits for the device.
        self._numels: dict[tuple[int, torch.device], torch.Tensor] = {}
        # Group of each parameter, fixed at construction (DeepSpeed later swaps ``params`` for flat partitions).
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.zero_layout: ZeroLayout | None = None

    def state_layout(self, p: torch.Tensor, key: str) -> str:
        """Checkpoint layout of a state tensor of an FSDP2 (row-sharded) parameter: see
        :meth:`megatron_pept.optim.galore.GaLoreOptimizer.state_layout`."""
        kind = self.param_groups[self._group_index[id(p)]]["block"]
        if self.zero_layout is not None:  # ZeRO: element-wise state per fragment, block statistics whole
            return "local" if key == "m" or (key == "v" and kind == "adam") else "replicated"
        if key in ("m", "kahan_comp") or (key == "v" and kind in ("adam", "row")):
            return "rows"
        return "replicated"

    def _fragment_step(
        self, p: torch.Tensor, param: torch.Tensor, grad: torch.Tensor, frag: FlatFragment, group: dict
    ) -> None:
        """One step of the fragment ``param`` of ``p``: element ``e`` of the flattening belongs to block
        ``e // block_numel`` (a head's rows, a row, or the whole tensor), so the blocks' mean squares are per-block
        sums over every rank's fragment, and the update of each element uses its block's value."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, kind = group["lr"], group["eps"], group["weight_decay"], group["block"]
        numel = frag.shape.numel()
        block_numel = {"head": group.get("head_numel"), "row": numel // max(1, frag.shape[0]), "tensor": numel}
        state = self.state[p]
        # bf16 weights (train.param_dtype=bf16): fp32 moments, and one fp32 update rounded in at the end
        rounded = self.weight_update is not None
        work = param.float() if rounded else param  # what the moments are shaped and typed after
        grad = grad.float() if rounded else grad
        if not state:
            state["step"] = torch.tensor(0.0)
            state["m"] = torch.zeros_like(work)
            if kind == "adam":
                state["v"] = torch.zeros_like(work)
            else:
                blocks = numel // block_numel[kind]
                state["v"] = work.new_zeros(()) if kind == "tensor" else work.new_zeros(blocks, 1)
            if rounded:
                self.weight_update.init_state(state, param)
        state["step"] += 1
        step = float(state["step"])
        if wd > 0 and not rounded:
            param.mul_(1 - lr * wd)
        state["m"].lerp_(grad, 1 - beta1)
        bias_correction1 = 1 - beta1**step
        if kind == "adam":
            state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            h = (state["v"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            if not rounded:
                param.addcdiv_(state["m"], h, value=-lr / bias_correction1)
                return
            update = state["m"] * (-lr / bias_correction1) / h
        else:
            size = block_numel[kind]
            ids = frag.block_ids(size, grad.device)
            mean_sq = frag.block_sums(grad.square(), ids, numel // size) / size
            state["v"].mul_(beta2).add_(mean_sq.view(state["v"].shape), alpha=1 - beta2)
            h = (state["v"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            stepsize = ((1 / bias_correction1) / h).reshape(-1)
            update = -(state["m"] * stepsize[ids]) * lr
            if not rounded:
                param.add_(update)
                return
        if wd > 0:
            update.add_(work.mul(-lr * wd))  # the sum the whole-tensor step makes (addition commutes exactly)
        self.weight_update.add_(p, param, state, update, fragment=frag)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, kind = group["lr"], group["eps"], group["weight_decay"], group["block"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.zero_layout is not None:
                    for q, frag in self.zero_layout[id(p)]:
                        self._fragment_step(q, frag.view(p), frag.view(p.grad), frag, group)
                    continue
                # Under FSDP2 each rank updates its own rows; block statistics that span ranks are summed.
                shard = RowShard(p) if isinstance(p, DTensor) else None
                param = p.to_local() if shard else p
                grad = p.grad.to_local() if shard else p.grad
                # bf16 weights (train.param_dtype=bf16): fp32 moments, and one fp32 update rounded in at the end
                rounded = self.weight_update is not None
                work = param.float() if rounded else param  # what the moments are shaped and typed after
                grad = grad.float() if rounded else grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["m"] = torch.zeros_like(work)
                    state["v"] = torch.zeros_like(work) if kind == "adam" else self._block_zeros(p, work, group)
                    if rounded:
                        self.weight_update.init_state(state, param)
                state["step"] += 1
                step = float(state["step"])
                delta = work.mul(-lr * wd) if rounded and wd > 0 else None
                if wd > 0 and not rounded:
                    param.mul_(1 - lr * wd)
                state["m"].lerp_(grad, 1 - beta1)
                if kind == "adam":
                    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                else:
                    state["v"].mul_(beta2).add_(self._block_mean_sq(p, grad, group, shard), alpha=1 - beta2)
                bias_correction1 = 1 - beta1**step
                h = (state["v"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                if kind == "adam":
                    if not rounded:
                        param.addcdiv_(state["m"], h, value=-lr / bias_correction1)
                        continue
                    update = state["m"] * (-lr / bias_correction1) / h
                else:
                    stepsize = (1 / bias_correction1) / h
                    if kind == "head" and shard is not None:
                        stepsize = stepsize[_head_of_rows(shard, p, group["head_numel"])]  # one row per local row
                    m = state["m"].view(stepsize.shape[0], -1) if kind != "tensor" else state["m"]
                    update = -(m * stepsize).view(param.shape) * lr
                    if not rounded:
                        param.add_(update)
                        continue
                delta = update if delta is None else delta.add_(update)
                self.weight_update.add_(p, param, state, delta, start=shard.start if shard else 0, shape=p.shape)
        return loss

    @staticmethod
    def _block_zeros(p: torch.Tensor, local: torch.Tensor, group: dict) -> torch.Tensor:
        kind = group["block"]
        if kind == "head":
            return torch.zeros(p.numel() // group["head_numel"], 1, dtype=local.dtype, device=local.device)
        if kind == "row":
            return torch.zeros(local.shape[0], 1, dtype=local.dtype, device=local.device)
        return torch.zeros((), dtype=local.dtype, device=local.device)

    def _block_mean_sq(self, p: torch.Tensor, grad: torch.Tensor, group: dict, shard: RowShard | None) -> torch.Tensor:
        kind = group["block"]
        if kind == "head":
            if shard is None:
                return torch.mean(grad.view(-1, group["head_numel"]).square(), dim=1, keepdim=True)
            heads = p.numel() // group["head_numel"]
            sums = torch.zeros(heads, dtype=grad.dtype, device=grad.device)
            rows_sq = grad.view(grad.shape[0], -1).square().sum(dim=1)
            sums.index_add_(0, _head_of_rows(shard, p, group["head_numel"]), rows_sq)
            return (shard.all_reduce(sums) / group["head_numel"]).view(heads, 1)
        if kind == "row":
            return torch.mean(grad.view(grad.shape[0], -1).square(), dim=1, keepdim=True)
        total = grad.square().sum()
        key = (id(p), grad.device)
        if key not in self._numels:
            self._numels[key] = torch.tensor(float(p.numel()), device=grad.device)
        numel = self._numels[key]
        if shard is not None:
            total = shard.all_reduce(total)
        if self.reduce_sum is not None:  # it may reduce in place: the kept count stays this rank's
            total, numel = self.reduce_sum(total), self.reduce_sum(numel.clone())
        return total / numel


def _head_of_rows(shard: RowShard, p: DTensor, head_numel: int) -> torch.Tensor:
    """The attention head of each of this rank's rows."""
    rows_per_head = head_numel // (p.numel() // p.shape[0])
    return shard.rows(p.to_local().device) // rows_per_head
