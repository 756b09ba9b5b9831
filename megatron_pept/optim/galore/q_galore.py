"""Q-GaLore's optimizer: GaLore with an int4 projector refreshed on an adaptive gap, 8-bit Adam moments, and int8
weights updated by stochastic rounding (Zhang et al. 2024, "Q-GaLore"; q-galore-torch 1.0).

One projected step of a weight (step ``t``, 0-based), as q-galore-torch's ``QGaLoreAdamW8bit`` does it:

1. the weight's fp32 gradient ``G`` (an int8 weight's from its layer, see :class:`Int8Layer`, averaged over the
   data-parallel ranks here: the backends only sync parameters that carry a ``.grad``);
2. on a refresh step (``t == 0`` or ``t % gap == 0``, with the current gap) the top-``rank`` singular subspace of
   ``G``; its first singular vector's cosine similarity with the previous one joins a queue, and the gap is
   multiplied by ``gamma_proj`` once the queue is full and its mean reaches ``cos_threshold``
   (:func:`~megatron_pept.optim.galore.quantize.next_gap`); the projector is kept quantised to ``proj_bits``
   (group-wise min-max, two codes a byte) and dequantised to project;
3. ``R = project(G)``; Adam in bitsandbytes' arithmetic on ``R`` (8-bit blockwise moments for states of at least
   4096 elements, fp32 below, as ``bnb.optim.AdamW8bit``) gives the update ``U`` (the learning rate included);
4. ``W <- deq(W) + scale * project_back(U)``, then decoupled weight decay ``W <- W - lr * wd * W``;
5. an int8 weight is quantised again, group-wise min-max with a zero point, by stochastic rounding (or to the
   nearest with ``stochastic_round=False``).

Unprojected parameters (embeddings, norms, the LM head) get the same 8-bit Adam, weight decay first, as bitsandbytes.

The rounding draws of a weight at a step come from generators seeded by the parameter's seed, the step and the block
of rows (:func:`~megatron_pept.optim.galore.quantize.rounding_noise`): they need no state, and a row gets the same
draws whichever rank holds it. Every piece of state (moments, the quantised projector, the gap, the similarity queue,
the previous singular vector, the counters) is a tensor in ``state_dict()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from megatron_pept.optim.galore.base import GaLoreOptimizer
from megatron_pept.optim.galore.quantize import (
    dequantize_groups,
    next_gap,
    pack_int4,
    quantize_groups,
    rounding_noise,
    unpack_int4,
)
from megatron_pept.optim.galore.views import _View
from megatron_pept.optim.projector import name_seed, projected_shape, projection_side, svd_basis
from megatron_pept.sharding import RowShard, all_reduce_, distributed, local

Q_GALORE_GROUP_DEFAULTS: dict[str, Any] = dict(
    proj_quant=True,
    proj_bits=4,
    proj_group_size=256,
    cos_threshold=0.4,
    gamma_proj=2.0,
    queue_size=5,
    weight_group_size=256,
    stochastic_round=True,
)

WEIGHT_BITS = 8


class Int8Layer(Protocol):
    """What the optimizer needs of a layer whose weight is held in int8 (``methods/q_galore.py``'s layer): the codes
    ``weight`` (a ``uint8`` parameter that never has a ``.grad``), their per-group ``weight_scales`` (fp32) and
    ``weight_zeros`` (``uint8``), both ``out x in / group_size``, the ``group_size`` and the fp32 gradient the
    layer's backward accumulates, whole, in ``weight_grad`` (None before the first backward of a step)."""

    weight: torch.Tensor
    weight_scales: torch.Tensor
    weight_zeros: torch.Tensor
    group_size: int
    weight_grad: torch.Tensor | None


NoiseSource = Callable[[torch.Tensor, int, torch.Size], torch.Tensor]
"""``(parameter, step, shape) -> uniform [0, 1) draws`` for stochastic rounding; tests pass one that draws as a
reference implementation does."""


class QGaLoreAdamW8bit(GaLoreOptimizer):
    """Q-GaLore: see the module docstring. Parameter groups with ``rank`` are projected (keys of
    :data:`~megatron_pept.optim.galore.GALORE_GROUP_DEFAULTS` and :data:`Q_GALORE_GROUP_DEFAULTS`); ``int8_layers``
    maps each int8 weight (its codes parameter) to its layer."""

    block_size = 256
    min_8bit_numel = 4096

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        param_names: Mapping[torch.Tensor, str] | None = None,
        int8_layers: Mapping[torch.Tensor, Int8Layer] | None = None,
        noise: NoiseSource | None = None,
    ) -> None:
        try:
            import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
            import bitsandbytes.functional as bnbf
        except Exception as err:
            raise ImportError(
                f"q_galore needs bitsandbytes ({type(err).__name__}: {err}); pip install 'megatron_pept[quant]'"
            ) from None
        self._maps = {True: bnbf.create_dynamic_map(signed=True), False: bnbf.create_dynamic_map(signed=False)}
        self._codes: dict[tuple[bool, torch.device], torch.Tensor] = {}
        self.int8_layers = dict(int8_layers or {})
        self.noise = noise
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, param_names=param_names)
        for group in self.param_groups:
            if "rank" in group:
                for key, value in Q_GALORE_GROUP_DEFAULTS.items():
                    group.setdefault(key, value)
                if group["update_rule"] != "galore" or group["dynamic_gap"] or group["ef_weight"] > 0:
                    raise ValueError("QGaLoreAdamW8bit runs GaLore's update with its own adaptive gap only")
                if group["proj_quant"] and not 1 <= group["proj_bits"] <= 8:
                    raise ValueError(f"proj_bits must be in [1, 8]; got {group['proj_bits']}")
        for p in self.int8_layers:
            if not any(p is q for g in self.param_groups if "rank" in g for q in g["params"]):
                raise ValueError("an int8 weight must be in a projected group (with a rank)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if "rank" in group:
                for key, value in Q_GALORE_GROUP_DEFAULTS.items():
                    group.setdefault(key, value)

    # -- 8-bit Adam, in bitsandbytes' arithmetic ------------------------------------------------------------------

    def _code(self, device: torch.device, *, signed: bool) -> torch.Tensor:
        key = (signed, device)
        if key not in self._codes:  # once per device: a step copies nothing from the host
            self._codes[key] = self._maps[signed].to(device)
        return self._codes[key]

    def _init_inner_state(self, state: dict[str, Any], shape: torch.Size, like: torch.Tensor, group: dict) -> None:
        self._init_moments(state, shape, like, whole_numel=shape.numel())

    def _init_moments(self, state: dict[str, Any], shape: torch.Size, like: torch.Tensor, *, whole_numel: int) -> None:
        # bitsandbytes keeps a state of fewer than 4096 elements (of the whole matrix) in fp32; larger ones as
        # uint8 codes (all zero) with zero absmaxes per block of 256, which dequantise to zeros.
        if whole_numel < self.min_8bit_numel:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=like.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=like.device)
            return
        blocks = -(-shape.numel() // self.block_size)
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}_q"] = torch.zeros(shape, dtype=torch.uint8, device=like.device)
            state[f"{key}_absmax"] = torch.zeros((blocks,), dtype=torch.float32, device=like.device)

    def _adam_into(
        self, target: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, group: dict, *, decay: bool
    ) -> None:
        """One Adam step applied to ``target`` (the parameter, or zeros for a projected update), computed as
        bitsandbytes' CPU kernels compute it (``optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"] if decay else 0.0
        step = int(state["step"])
        eight = "exp_avg_q" in state
        if eight:
            ops = torch.ops.bitsandbytes
            exp_avg = ops.dequantize_blockwise(
                state["exp_avg_q"], state["exp_avg_absmax"], self._code(grad.device, signed=True), 256, torch.float32
            ).view(grad.shape)
            exp_avg_sq = ops.dequantize_blockwise(
                state["exp_avg_sq_q"],
                state["exp_avg_sq_absmax"],
                self._code(grad.device, signed=False),
                256,
                torch.float32,
            ).view(grad.shape)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        if wd > 0.0:
            target.mul_(1.0 - lr * wd)
        if eight:
            denom = (exp_avg_sq.sqrt() / correction2).add_(eps)
            target.addcdiv_(exp_avg, denom, value=-lr / correction1)
            for key, value, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
                q, absmax = torch.ops.bitsandbytes.quantize_blockwise(
                    value.contiguous(), self._code(grad.device, signed=signed), self.block_size
                )
                state[f"{key}_q"].copy_(q.view(state[f"{key}_q"].shape))
                state[f"{key}_absmax"].copy_(absmax)
        else:
            update = exp_avg / (exp_avg_sq.sqrt() + eps * correction2)
            target.add_(update, alpha=-lr * correction2 / correction1)

    def _plain_step(self, p: torch.Tensor, group: dict, view: _View) -> None:
        param, grad = view.param(p), view.grad(p)
        grad = grad if grad.dtype == torch.float32 else grad.float()
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            self._init_moments(state, grad.shape, grad, whole_numel=view.shape.numel())
        state["step"] += 1
        if param.dtype == torch.float32:
            self._adam_into(param, state, grad, group, decay=True)
            return
        before = param.float()
        work = before.clone()
        self._adam_into(work, state, grad, group, decay=True)
        if self.weight_update is None:
            param.copy_(work)
        else:  # bf16 weights (train.param_dtype=bf16): the step rounded in by optim.weight_update
            self.weight_update.add_(p, param, state, work.sub_(before), start=view.start, shape=view.shape)

    # -- the projected step -----------------------------------------------------------------------------------------

    def _gradient(self, p: torch.Tensor, view: _View) -> torch.Tensor:
        """This rank's part of ``p``'s fp32 gradient, averaged over the data-parallel ranks."""
        layer = self.int8_layers.get(p)
        if layer is None:
            grad = view.grad(p)
            return grad if grad.dtype == torch.float32 else grad.float()
        grad = layer.weight_grad.float()
        if isinstance(p, DTensor):  # FSDP2: the whole gradient of this rank's micro-batches; keep our rows
            rows = RowShard(p)
            all_reduce_(grad, rows.group)
            return grad[rows.start : rows.stop].div_(rows.mesh.size())
        if distributed():  # DDP: the layer's gradient is not a parameter's .grad, so DDP did not reduce it
            world = torch.distributed.get_world_size()
            return all_reduce_(grad).div_(world)
        return grad

    def _rows(self, p: torch.Tensor) -> tuple[int, int]:
        if isinstance(p, DTensor):
            rows = RowShard(p)
            return rows.start, rows.stop
        return 0, p.shape[0]

    def _projector(self, state: dict[str, Any], group: dict, view: _View, side: str) -> torch.Tensor:
        """The dequantised projector (this rank's part of it)."""
        if not group["proj_quant"]:
            return state["projector"]
        rank = min(group["rank"], *view.shape)
        m, n = view.shape
        shape = torch.Size((rank, n) if side == "right" else (m, rank))
        codes = state["proj_q"]
        codes = unpack_int4(codes, shape) if group["proj_bits"] <= 4 else codes.view(shape)
        whole = dequantize_groups(codes, state["proj_scales"], state["proj_zeros"], group_size=group["proj_group_size"])
        return view.local_basis(whole, side)

    def _q_refresh(
        self, state: dict[str, Any], grad: torch.Tensor, group: dict, side: str, view: _View, rank: int
    ) -> None:
        whole = view.gather(grad)  # sharded: the whole gradient, on refresh steps only
        start = time.perf_counter()
        basis = svd_basis(whole, rank=rank, side=side)
        if grad.is_cuda:  # refresh steps only: the SVD's time, for svd_seconds
            torch.cuda.synchronize(grad.device)
        self.last_svd_seconds += time.perf_counter() - start
        vector = (basis[:1, :] if side == "right" else basis[:, :1]).clone().flatten()
        old = self._projector(state, group, view, side) if int(state["refreshes"]) > 0 else None
        if int(state["refreshes"]) > 0:
            # A refresh step may synchronise (the SVD does): the queue and the gap are decided on the host, in
            # Python floats, as q-galore-torch decides them.
            count = int(state["queue_len"])
            queue = [float(x) for x in state["cos_queue"][:count].tolist()]
            if count == group["queue_size"]:
                queue.pop(0)
            queue.append(F.cosine_similarity(state["past_vector"], vector, dim=0).item())
            gap = next_gap(
                int(state["proj_gap"]),
                queue,
                queue_size=group["queue_size"],
                cos_threshold=group["cos_threshold"],
                gamma=group["gamma_proj"],
            )
            state["cos_queue"][: len(queue)].copy_(torch.tensor(queue, dtype=torch.float64))
            state["queue_len"].fill_(len(queue))
            state["proj_gap"].fill_(gap)
        state["past_vector"] = vector
        if group["proj_quant"]:
            codes, scales, zeros = quantize_groups(basis, group_size=group["proj_group_size"], bits=group["proj_bits"])
            state["proj_q"] = pack_int4(codes) if group["proj_bits"] <= 4 else codes.reshape(-1)
            state["proj_scales"], state["proj_zeros"] = scales, zeros
        else:
            state["projector"] = view.local_basis(basis, side)
        if old is not None:
            self.last_overlaps.append(view.overlap(old, self._projector(state, group, view, side), side))
        state["refreshes"] += 1
        self.last_refreshes += 1

    def _projected_step(self, p: torch.Tensor, group: dict, index: int, view: _View) -> None:
        layer = self.int8_layers.get(p)
        grad = self._gradient(p, view)
        if len(view.shape) != 2:
            raise ValueError(f"Q-GaLore projects matrices; a parameter of shape {tuple(view.shape)} was given a rank")
        side = projection_side(view.shape)
        rank = min(group["rank"], *view.shape)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["refreshes"] = torch.tensor(0)
            state["seed"] = torch.tensor(
                name_seed(self.param_names[p], base_seed=group["seed"]) if p in self.param_names else index
            )
            state["proj_gap"] = torch.tensor(int(group["update_proj_gap"]))
            state["queue_len"] = torch.tensor(0)
            state["cos_queue"] = torch.zeros(group["queue_size"], dtype=torch.float64)
            whole_low = projected_shape(tuple(view.shape), rank=rank)
            self._init_moments(state, view.low_shape(grad, side, rank), grad, whole_numel=whole_low[0] * whole_low[1])
        step = int(state["step"])
        if step == 0 or step % int(state["proj_gap"]) == 0:
            self._q_refresh(state, grad, group, side, view, rank)
        basis = self._projector(state, group, view, side)
        low = view.project(grad, basis, side)
        state["step"] += 1
        update = torch.zeros_like(low)
        self._adam_into(update, state, low, group, decay=False)
        if layer is None:  # a weight that is not int8: GaLore's update and decay (rounded in if it is bf16)
            self._apply(p, view.param(p), state, view.back(update, basis, side) * group["scale"], -1.0, group, view)
            return
        codes, scales, zeros = local(layer.weight), local(layer.weight_scales), local(layer.weight_zeros)
        weight = dequantize_groups(codes, scales, zeros, group_size=layer.group_size)
        weight.add_(view.back(update, basis, side) * group["scale"])
        if group["weight_decay"] > 0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])
        noise = None
        if group["stochastic_round"]:
            groups_shape = torch.Size((weight.numel() // layer.group_size, layer.group_size))
            if self.noise is not None:
                noise = self.noise(p, step, groups_shape)
            else:
                noise = rounding_noise(
                    int(state["seed"]), step, rows=self._rows(p), cols=weight.shape[1], device=weight.device
                )
        new_codes, new_scales, new_zeros = quantize_groups(
            weight, group_size=layer.group_size, bits=WEIGHT_BITS, noise=noise
        )
        codes.copy_(new_codes)
        scales.copy_(new_scales.view(scales.shape))
        zeros.copy_(new_zeros.view(zeros.shape))

    # -- the loop -----------------------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for layer in self.int8_layers.values():
            layer.weight_grad = None

    def state_layout(self, p: torch.Tensor, key: str) -> str:
        if key in ("proj_gap", "queue_len", "cos_queue", "past_vector", "proj_q", "proj_scales", "proj_zeros"):
            return "replicated"
        return super().state_layout(p, key)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.zero_layout is not None:
            raise RuntimeError("Q-GaLore does not run under DeepSpeed ZeRO: its int8 weights are not ZeRO's to hold")
        self.last_refreshes, self.last_svd_seconds, self.last_overlaps = 0, 0.0, []
        self.last_ef_residual_sq = 0.0
        self._reset_scaling_stats()
        for group in self.param_groups:
            for p in group["params"]:
                layer = self.int8_layers.get(p)
                if (layer.weight_grad if layer is not None else p.grad) is None:
                    continue
                view = self._view_of(p)
                if "rank" in group:
                    self._projected_step(p, group, self.param_index[p], view)
                else:
                    self._plain_step(p, group, view)
        return loss
