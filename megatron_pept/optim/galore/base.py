"""The projecting base optimizer of the GaLore family.

Parameter groups carrying ``rank`` are projected (see :mod:`megatron_pept.optim.projector`); the others get the
same optimizer unprojected. A projected step, for a weight ``W`` with gradient ``G`` (step ``t``, 0-based):

1. error feedback (``ef_weight = w > 0``): ``G <- G + w * S`` with ``S`` the residual kept from the last step;
2. on a refresh step (fixed gap or the dynamic schedule) the projector ``P`` becomes the top-``rank`` singular
   subspace of ``G`` (full SVD, or a randomized range finder seeded per parameter and refresh);
3. ``R = project(G)``; with error feedback the new residual is ``S = G - project_back(R)``;
4. the inner optimizer turns ``R`` into a low-rank update ``U`` (its moments have ``R``'s shape);
5. ``W <- W - lr_t * scale * project_back(U)``, and decoupled weight decay on the full weight.

Two more update rules reuse steps 2-4 (group key ``update_rule``; AdamW only) and replace step 5:

* ``apollo`` (APOLLO, Zhu et al. 2025): the projector is a Gaussian matrix (``projector="random"``, seeded per
  parameter name and refresh, regenerated rather than stored), and the moments only measure a scaling factor
  ``s`` per channel or per tensor (``scale_type``; :mod:`megatron_pept.optim.scaling`):
  ``W <- W - lr_t * scale * limit(s * G)``.
* ``fira`` (Fira, Chen et al. 2024): GaLore's update plus the residual the projection misses, scaled per
  channel: ``W <- W - lr_t * (scale * P U + limit(s * (G - scale * P R)))``.

``limit`` is Fira's norm-growth limiter (``norm_growth_limit``, 1.01 in both papers; 0 turns it off). Both rules
compute exactly what apollo-torch's ``APOLLOAdamW`` and fira's ``FiraAdamW`` compute, in the same order (tested
bit for bit); ``scale`` here is the multiplier itself (apollo-torch's ``scale`` argument is its square). Sharded
(FSDP2 rows, ZeRO fragments), each rank scales its own part of ``G``: the random projection is drawn whole from
its seed on every rank and sliced like an SVD projector, a channel's factor is local (a right projection's rows
are whole where they are held, a left projection's columns whole on every rank), and the per-tensor factor and
the limiter's norm come from squared norms summed over the ranks (one all-reduce of two numbers per matrix).

Every piece of state, the projector and its refresh count and seed included, is a tensor in ``state_dict()``, so
checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from megatron_pept.optim.adamw import KeepStateDtypes
from megatron_pept.optim.galore.views import _RowShard, _View, _ZeroView
from megatron_pept.optim.projector import (
    RefreshSchedule,
    column_major,
    name_seed,
    projection_seed,
    projection_side,
    random_projection,
    randomized_basis,
    svd_basis,
)
from megatron_pept.optim.scaling import (
    SCALE_TYPES,
    limit_norm_growth,
    scaling_factor,
    tensor_factor_from_squares,
)
from megatron_pept.optim.sharded import ShardedOptimizer
from megatron_pept.optim.weight_update import WeightUpdate
from megatron_pept.sharding import ZeroLayout

GALORE_GROUP_DEFAULTS: dict[str, Any] = dict(
    rank=128,
    update_proj_gap=200,
    scale=0.25,
    proj_type="std",
    dynamic_gap=False,
    dynamic_first=200,
    dynamic_growth=1.5,
    dynamic_cap=2500,
    dynamic_rule="step",
    ef_weight=0.0,
    svd="full",
    svd_oversample=8,
    svd_power_iters=1,
    projector_dtype="fp32",
    seed=0,
    projector="svd",
    update_rule="galore",
    scale_type="channel",
    norm_growth_limit=0.0,
)
PROJECTORS = ("svd", "random")
UPDATE_RULES = ("galore", "apollo", "fira")


class GaLoreOptimizer(ShardedOptimizer, KeepStateDtypes, torch.optim.Optimizer):
    """Projection machinery shared by the GaLore optimizers; subclasses give the inner update."""

    # The inner update treats each entry of the projected gradient on its own (Adam): under ZeRO a right
    # projection's state can then be kept by rows, per fragment (see _ZeroView).
    elementwise_inner = True
    weight_update: WeightUpdate | None = None
    """How updates reach bf16 weights (``train.param_dtype=bf16``; set by the trainer); None: fp32 weights."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        param_names: Mapping[torch.Tensor, str] | None = None,
    ) -> None:
        super().__init__(params, defaults)
        # Names seed random projections (projector="random"): a name, unlike a place in a list, is the same on
        # every rank and in every per-layer optimizer.
        self.param_names = dict(param_names or {})
        for group in self.param_groups:
            if "rank" in group:
                for key, value in GALORE_GROUP_DEFAULTS.items():
                    group.setdefault(key, value)
                self._check_group(group)
        # The random projectors in use, regenerated from (seed, refresh) when missing (e.g. after a checkpoint
        # load): param -> ((seed, refresh), projector). Shared with the per-layer optimizers split from this one.
        self._random_bases: dict[torch.Tensor, tuple[tuple[int, int], torch.Tensor]] = {}
        # A stable number per parameter: seeds its randomized sketches (kept when split for per-layer updates).
        self.param_index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        # Group of each parameter, fixed at construction (DeepSpeed later swaps ``params`` for flat partitions).
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        # Statistics of the last step() (read by the training method for logging). Those made from tensors stay
        # tensors (0-d, on the device): the step never waits for the device; the logger reads them at its interval.
        self.last_refreshes = 0
        self.last_svd_seconds = 0.0
        self.last_overlaps: list[torch.Tensor] = []
        self.last_ef_residual_sq: torch.Tensor | float = 0.0  # float64 on the device once a matrix adds to it
        self._reset_scaling_stats()
        self.zero_layout: ZeroLayout | None = None
        self._zero_first: int | None = None

    def _check_group(self, group: dict) -> None:
        from megatron_pept.optim.galore.adamw import GaLoreAdamW  # a subclass: it imports this module

        if group["proj_type"] != "std":
            raise ValueError(f"proj_type {group['proj_type']!r} is not supported; only 'std'")
        if group["svd"] not in ("full", "randomized"):
            raise ValueError(f"svd must be 'full' or 'randomized'; got {group['svd']!r}")
        if group["projector_dtype"] not in ("auto", "fp32", "bf16"):
            raise ValueError(f"projector_dtype must be 'auto', 'fp32' or 'bf16'; got {group['projector_dtype']!r}")
        if group["projector"] not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}; got {group['projector']!r}")
        if group["update_rule"] not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {group['update_rule']!r}")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {', '.join(SCALE_TYPES)}; got {group['scale_type']!r}")
        if not (group["norm_growth_limit"] == 0 or group["norm_growth_limit"] > 1):
            raise ValueError(f"norm_growth_limit must be > 1 (or 0: off); got {group['norm_growth_limit']}")
        if _scales(group) and not isinstance(self, GaLoreAdamW):
            raise ValueError(f"update_rule {group['update_rule']!r} needs Adam moments (GaLoreAdamW)")
        if group["projector"] == "random":
            unnamed = [tuple(p.shape) for p in group["params"] if p not in self.param_names]
            if unnamed:
                raise ValueError(
                    f"projector='random' seeds each projection from its parameter's name; pass param_names= with "
                    f"every parameter of the group ({len(unnamed)} unnamed, e.g. of shape {unnamed[0]})"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch takes the groups' settings from the saved dict: one saved before a setting existed lacks it.
        for group in self.param_groups:
            if "rank" in group:
                for key, value in GALORE_GROUP_DEFAULTS.items():
                    group.setdefault(key, value)

    def _reset_scaling_stats(self) -> None:
        # Tensors, summed without a host synchronisation.
        self.last_scaling_sum: torch.Tensor | float = 0.0
        self.last_scaled = 0
        self.last_limited: torch.Tensor | int = 0

    # -- to be provided by subclasses --------------------------------------------------------------------------

    def _init_inner_state(self, state: dict[str, Any], shape: torch.Size, like: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def _inner_update(self, state: dict[str, Any], grad: torch.Tensor, group: dict, param: _View) -> tuple:
        """Return ``(update, step_size)``: the parameter moves by ``-step_size * project_back(update)``. ``param``
        is the view of the parameter being stepped (``param.value``: this rank's part of it)."""
        raise NotImplementedError

    def _decay(self, p: torch.Tensor, group: dict, step_size: float) -> None:
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _decay_rate(self, group: dict, step_size: float) -> float:
        """The fraction of the weight :meth:`_decay` takes off (for the rounded update of bf16 weights)."""
        return group["lr"] * group["weight_decay"] if group["weight_decay"] > 0 else 0.0

    # -- projection --------------------------------------------------------------------------------------------

    def _schedule(self, group: dict) -> RefreshSchedule:
        return RefreshSchedule(
            gap=group["update_proj_gap"],
            dynamic=group["dynamic_gap"],
            first=group["dynamic_first"],
            growth=group["dynamic_growth"],
            cap=group["dynamic_cap"],
            rule=group["dynamic_rule"],
        )

    def _refresh(
        self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, group: dict, side: str, view: _View
    ) -> None:
        if group["projector"] == "random":  # no gradient needed: a fresh draw, kept out of the state
            start = time.perf_counter()
            state["refreshes"] += 1
            self._random_basis(p, state, group["rank"], side, view, grad.device)
            self.last_svd_seconds += time.perf_counter() - start
            self.last_refreshes += 1
            return
        whole = view.gather(grad)  # sharded: the whole gradient, on refresh steps only
        start = time.perf_counter()
        if group["svd"] == "full":
            basis = svd_basis(whole, rank=group["rank"], side=side)
        else:
            gen = torch.Generator().manual_seed(int(state["seed"]) * 1_000_003 + int(state["refreshes"]))
            basis = randomized_basis(
                whole,
                rank=group["rank"],
                side=side,
                generator=gen,
                oversample=group["svd_oversample"],
                power_iters=group["svd_power_iters"],
            )
        if grad.is_cuda:  # a refresh step only (every update_proj_gap steps): the time the SVD took, for svd_seconds
            torch.cuda.synchronize(grad.device)
        self.last_svd_seconds += time.perf_counter() - start
        basis = view.local_basis(basis.to(grad.dtype), side)
        if int(state["refreshes"]) > 0:  # a host counter (HOST_STATE_KEYS): no synchronisation
            self.last_overlaps.append(view.overlap(state["projector"].to(basis.dtype), basis, side))
        # Held in bf16 where asked (method.projector_dtype; auto: with bf16 weights, as galore-torch holds it in its
        # bf16 gradient's dtype): half the bytes, computed in fp32 and used upcast.
        want = group.get("projector_dtype", "fp32")
        bf16 = want == "bf16" or (want == "auto" and view.param(p).dtype == torch.bfloat16)
        state["projector"] = basis.to(torch.bfloat16) if bf16 else basis
        state["refreshes"] += 1
        self.last_refreshes += 1

    def held_projector_bytes(self) -> int:
        """Bytes of the random projectors this optimizer holds outside its state (APOLLO's, drawn from seeds and
        never checkpointed): memory the step needs that ``state`` does not show."""
        return sum(basis.numel() * basis.element_size() for _, basis in self._random_bases.values())

    def _random_basis(
        self, p: torch.Tensor, state: dict[str, Any], rank: int, side: str, view: _View, device: torch.device
    ) -> torch.Tensor:
        """The random projector of the current refresh, drawn again if this optimizer does not hold it (first use,
        after a checkpoint load or a rollback): it is a function of the parameter's seed and refresh count. Every
        rank draws the whole matrix (``r x min(m, n)``) and keeps its part as an SVD projector's (a left
        projector's rows under FSDP2), so a shard is projected by exactly the rows of one process's matrix."""
        key = (int(state["seed"]), int(state["refreshes"]) - 1)
        held = self._random_bases.get(p)
        if held is None or held[0] != key:
            basis = random_projection(tuple(view.shape), rank=rank, side=side, seed=projection_seed(*key))
            held = self._random_bases[p] = (key, view.local_basis(basis.to(device), side))
        return held[1]

    def _full_update(
        self,
        state: dict[str, Any],
        grad: torch.Tensor,
        low: torch.Tensor,
        update: torch.Tensor,
        basis: torch.Tensor,
        side: str,
        group: dict,
        view: _View,
        *,
        first: bool,
    ) -> torch.Tensor:
        """The full-size update the step size multiplies, by the group's ``update_rule``: GaLore's ``scale *
        P U``, APOLLO's ``scale * limit(s * G)`` or Fira's ``scale * P U + limit(s * (G - scale * P R))``, with
        ``R`` the projected gradient, ``U`` the inner optimizer's update of it and ``s`` its scaling factor."""
        rule = group["update_rule"]
        if rule == "galore":
            return view.back(update, basis, side) * group["scale"]
        scale_type, gamma = group["scale_type"], group["norm_growth_limit"]
        # Sharded, a right projection's U and R hold only this rank's rows (channels): a factor per channel is
        # local, one per tensor sums squared norms over the ranks.
        split = view.sharded and view.low_split(side)
        if split and scale_type == "tensor":
            squares = torch.stack([view.owned_rows(update).square().sum(), view.owned_rows(low).square().sum()])
            squares = view.sum_all(squares)
            factor = tensor_factor_from_squares(squares[0], squares[1])
        else:
            factor = scaling_factor(update, low, side=side, scale_type=scale_type)
        if rule == "apollo":
            scaled = grad * view.expand(factor, side)
        else:
            scaled = (grad - view.back(low, basis, side) * group["scale"]) * view.expand(factor, side)
        norm, mean = None, factor.mean()
        if view.sharded:  # the limiter's norm and the logged mean factor over the whole matrix: one all-reduce
            channels_split = split and scale_type == "channel"
            if gamma > 0 or channels_split:
                zero = scaled.new_zeros(())
                sums = view.sum_all(
                    torch.stack(
                        [
                            scaled.square().sum() if gamma > 0 else zero,
                            view.owned_rows(factor).sum() if channels_split else zero,
                        ]
                    )
                )
                norm = sums[0].sqrt()
                mean = sums[1] / view.shape[0] if channels_split else mean
        self.last_scaling_sum = self.last_scaling_sum + mean
        self.last_scaled += 1
        if rule == "apollo":
            return self._limit(state, scaled, group, first=first, norm=norm) * group["scale"]
        return view.back(update, basis, side) * group["scale"] + self._limit(
            state, scaled, group, first=first, norm=norm
        )

    def _limit(
        self, state: dict[str, Any], update: torch.Tensor, group: dict, *, first: bool, norm: torch.Tensor | None
    ) -> torch.Tensor:
        """Fira's limiter on ``update``; ``norm``: the whole matrix's norm of it when ``update`` is a shard."""
        gamma = group["norm_growth_limit"]
        if gamma == 0:
            return update
        if first:  # nothing to compare with yet: the first norm is the reference, as in both packages
            state["limiter_norm"].copy_(torch.linalg.vector_norm(update) if norm is None else norm)
            return update
        update, norm, limited = limit_norm_growth(update, state["limiter_norm"], gamma=gamma, norm=norm)
        state["limiter_norm"].copy_(norm)
        self.last_limited = self.last_limited + limited.to(torch.int64)
        return update

    def _projected_step(self, p: torch.Tensor, group: dict, index: int, view: _View) -> None:
        """One projected step on whatever part of ``p`` this rank holds (see :class:`_View`): the whole matrix, its
        FSDP2 rows (a right projection is local, a left one needs one all-reduce of ``r x n``), or a ZeRO fragment
        (the projected gradient is summed over the ranks: one all-reduce of the low-rank size). The whole gradient
        is gathered only on refresh steps, to compute the projector."""
        param, grad = view.param(p), view.grad(p)
        grad = grad if grad.dtype == torch.float32 else grad.float()
        if len(view.shape) != 2:
            raise ValueError(f"GaLore projects matrices; a parameter of shape {tuple(view.shape)} was given a rank")
        side = projection_side(view.shape)
        rank = min(group["rank"], *view.shape)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["refreshes"] = torch.tensor(0)
            if group["projector"] == "random":
                state["seed"] = torch.tensor(name_seed(self.param_names[p], base_seed=group["seed"]))
            else:
                state["seed"] = torch.tensor(group["seed"] * 100_003 + index)
            self._init_inner_state(state, view.low_shape(grad, side, rank), grad, group)
            if group["ef_weight"] > 0:
                state["ef_residual"] = torch.zeros_like(grad)
            if _scales(group) and group["norm_growth_limit"] > 0:
                state["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=grad.device)
        if group["ef_weight"] > 0:
            grad = grad + group["ef_weight"] * state["ef_residual"]
        step = int(state["step"])
        if step == 0 or self._schedule(group).is_refresh(step):
            self._refresh(p, state, grad, {**group, "rank": rank}, side, view)
        if group["projector"] == "random":
            basis = self._random_basis(p, state, rank, side, view, grad.device)
        else:
            basis = state["projector"].float()  # a no-op for an fp32 projector
        low = view.project(grad, basis, side)
        if group["ef_weight"] > 0:
            residual = grad - view.back(low, basis, side)
            state["ef_residual"].copy_(residual)
            # float64, summed in the order the host summed Python floats: the same value, read only when logged
            self.last_ef_residual_sq = self.last_ef_residual_sq + view.sum_all(residual.square().sum()).double()
        state["step"] += 1
        update, step_size = self._inner_update(state, low, group, view.with_param(param))
        full_update = self._full_update(state, grad, low, update, basis, side, group, view, first=step == 0)
        self._apply(p, param, state, full_update, step_size, group, view)

    def _plain_step(self, p: torch.Tensor, group: dict, view: _View) -> None:
        param, grad = view.param(p), view.grad(p)  # element-wise updates are the same on any part of p
        grad = grad if grad.dtype == torch.float32 else grad.float()
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            self._init_inner_state(state, grad.shape, grad, group)
        state["step"] += 1
        update, step_size = self._inner_update(state, grad, group, view.with_param(param))
        self._apply(p, param, state, update, step_size, group, view)

    def _apply(
        self,
        p: torch.Tensor,
        param: torch.Tensor,
        state: dict[str, Any],
        update: torch.Tensor,
        step_size: float,
        group: dict,
        view: _View,
    ) -> None:
        """``param <- param - step_size * update``, then weight decay (of the updated weight): in place on fp32
        weights; on bf16 weights the same, computed in fp32 as one step that :attr:`weight_update` rounds in."""
        if self.weight_update is None:
            param.add_(update.to(param.dtype), alpha=-step_size)
            self._decay(param, group, step_size)
            return
        delta = update * -step_size
        rate = self._decay_rate(group, step_size)
        if rate:
            delta.sub_(param.float().add_(delta), alpha=rate)
        frag = getattr(view, "frag", None)  # a ZeRO fragment (or an FSDP2 row shard seen as one)
        self.weight_update.add_(p, param, state, delta, start=view.start, shape=view.shape, fragment=frag)

    def _view_of(self, p: torch.Tensor) -> _View:
        return _RowShard(p) if isinstance(p, DTensor) else _View(p)

    def restore_loaded_state(self, p: torch.Tensor) -> None:
        """After a checkpoint load: give a full-SVD projector back the column-major layout LAPACK produced (a
        loaded tensor is row-major, and the projection matmuls would then differ in the last bit, breaking
        bit-exact resume). Row shards of a left projector are row-major in training too."""
        from megatron_pept.optim.galore.adafactor import GaLoreAdafactor  # a subclass: it imports this module

        state = self.state[p]
        group = self.param_groups[self._group_index[id(p)]] if id(p) in self._group_index else None
        if group is None or "projector" not in state or group.get("svd") != "full":
            return
        if isinstance(p, DTensor) and projection_side(p.shape) == "left" and not isinstance(self, GaLoreAdafactor):
            return
        state["projector"] = column_major(state["projector"])

    def state_layout(self, p: torch.Tensor, key: str) -> str:
        """How a state tensor of an FSDP2 (row-sharded) parameter is laid out across ranks, for checkpoints:
        ``rows`` (this rank's rows, reshardable), ``replicated`` (whole on every rank) or ``local`` (rank-specific
        but not by rows: 8-bit quantisation blocks; reloads on the same number of ranks only)."""
        if key in ("step", "refreshes", "seed", "limiter_norm", "rounds"):
            return "replicated"
        if self.zero_layout is not None:  # ZeRO: projected state whole on every rank, the rest per fragment
            projected = "rank" in self.param_groups[self._group_index[id(p)]]
            if projected and key != "ef_residual" and key != "projector" and self.elementwise_inner:
                return "local" if projection_side(self._zero_shape(p)) == "right" else "replicated"
            return "replicated" if projected and key != "ef_residual" else "local"
        if key.endswith(("_q", "_absmax")):
            return "local"
        projected = "rank" in self.param_groups[self._group_index[id(p)]]
        if key in ("ef_residual", "kahan_comp") or not projected:
            return "rows"
        side = projection_side(p.shape)
        if key == "projector":
            return "rows" if side == "left" else "replicated"
        return "rows" if side == "right" else "replicated"  # projected-space moments: m x r or r x n

    # -- DeepSpeed ZeRO ----------------------------------------------------------------------------------------

    def _zero_shape(self, p: torch.Tensor) -> torch.Size:
        return next(f.shape for pieces in self.zero_layout.values() for q, f in pieces if q is p)

    def attach_zero(self, layout: ZeroLayout) -> None:
        """Under ZeRO, projected-space moments are kept whole (every rank computes the same ones from the
        all-reduced low-rank gradient), error-feedback buffers and element-wise moments per fragment."""
        super().attach_zero(layout)
        self._zero_first = next(iter(layout), None)

    def step_stats(self) -> dict[str, Any]:
        return {
            "refreshes": self.last_refreshes,
            "svd_seconds": self.last_svd_seconds,
            "overlaps": list(self.last_overlaps),
            "ef_residual_sq": self.last_ef_residual_sq,
            "scaling_factor_sum": self.last_scaling_sum,
            "scaled_matrices": self.last_scaled,
            "limited_matrices": self.last_limited,
        }

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self.zero_layout
        # ZeRO steps one parameter group per call: statistics restart with the first group of an optimizer step.
        if layout is None or any(id(f) == self._zero_first for g in self.param_groups for f in g["params"]):
            self.last_refreshes, self.last_svd_seconds, self.last_overlaps = 0, 0.0, []
            self.last_ef_residual_sq = 0.0
            self._reset_scaling_stats()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if layout is None:
                    pieces = [(p, self._view_of(p))]
                else:
                    local = self.elementwise_inner
                    pieces = [(q, _ZeroView(f, p, p.grad, row_local=local)) for q, f in layout[id(p)]]
                for q, view in pieces:
                    if "rank" in group:
                        self._projected_step(q, group, self.param_index[q], view)
                    else:
                        self._plain_step(q, group, view)
        return loss


def _scales(group: dict) -> bool:
    """The group's update is scaled from its projected moments (APOLLO, Fira) rather than projected back."""
    return group.get("update_rule", "galore") != "galore"
