"""How an optimizer's update reaches a weight held in bf16 (``train.param_dtype=bf16``, ``optim.weight_update``).

With no fp32 master, ``W + delta`` must be rounded back to bf16 at every step, and an update smaller than half a
bf16 step of the weight (8 significant bits: a relative 2^-9) is lost to round-to-nearest. Three rules:

* ``nearest``: plain rounding, for comparison. Small updates vanish; the weights stall once the learning rate
  decays (the curves show it).
* ``stochastic`` (the default): rounds up with probability equal to the fraction of a bf16 step the exact value
  lies above the lower neighbour, so the rounded weight equals ``W + delta`` in expectation (unbiased): the random
  bits are added below bf16's last kept bit and truncated (:func:`stochastic_round`). The bits are drawn by row
  blocks from (``train.seed``, the weight's name, its count of rounded updates) (:mod:`megatron_pept.seeded`):
  the same on one process, on DDP replicas, on FSDP2 shards and on DeepSpeed ZeRO's flat partitions
  (:meth:`WeightUpdate.add_flat_`), and a checkpoint need only keep the count
  (``rounds``, a host counter in the optimizer state).
* ``kahan``: Kahan summation, as torch-optimi 0.3.3 does it: a bf16 compensation buffer per weight
  (``kahan_comp``) gathers each update plus what the last rounding lost, the weight moves by it, and the
  buffer keeps the new rounding error. Two bytes a weight, deterministic.

An optimizer computes its step in fp32 (weight decay included: ``delta = -lr * (update + wd * W)``) and hands
it to :meth:`WeightUpdate.add_`, with the part of the weight this rank holds. fp32 weights never come here: their
optimizers keep their own in-place arithmetic, bit for bit as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_pept import sharding
from megatron_pept.seeded import draw_rows
from megatron_pept.sharding import FlatFragment

WEIGHT_UPDATES = ("stochastic", "kahan", "nearest")
ROUND_STATE_KEYS = frozenset({"rounds", "kahan_comp"})
"""State a :class:`WeightUpdate` adds to a parameter's optimizer state."""

_LOW_BITS = 1 << 16  # bf16 keeps the high 16 bits of an fp32


def stochastic_round(exact: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``exact`` (fp32) rounded to bf16 stochastically: ``bits`` (int32, uniform in [0, 2^16), ``exact``'s shape)
    are added to the 16 low bits bf16 drops, which carry into the kept bits with probability equal to the dropped
    fraction; the sum is then truncated. fp32 is sign and magnitude, so this rounds the magnitude for either sign."""
    as_int = exact.contiguous().view(torch.int32)
    kept = (as_int + bits) & -_LOW_BITS
    return kept.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def random_bits(
    *, name: str, seed: int, count: int, start: int, rows: int, shape: torch.Size | tuple[int, ...], device: Any
) -> torch.Tensor:
    """The rounding bits of rows ``[start, start + rows)`` of weight ``name`` (whole ``shape``) at its
    ``count``-th rounded update, as a ``(rows, values per row)`` int32 tensor."""

    def draw(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, _LOW_BITS, size, generator=generator, dtype=torch.int32, device=device)

    return draw_rows(
        start=start, rows=rows, shape=shape, name=name, seed=seed, purpose=f"round/{count}", draw=draw, device=device
    )


class WeightUpdate:
    """Applies fp32 updates to bf16 weights by one of :data:`WEIGHT_UPDATES`.

    ``names``: every parameter's name (seeds its rounding bits); ``seed``: the run's seed. The optimizer keeps the
    per-weight state this adds (:meth:`init_state`) in its own ``state[p]``, so it is checkpointed, resharded and
    split for per-layer updates with the rest."""

    def __init__(self, mode: str, *, seed: int, names: Mapping[torch.Tensor, str]) -> None:
        if mode not in WEIGHT_UPDATES:
            raise ValueError(f"optim.weight_update must be one of {', '.join(WEIGHT_UPDATES)}; got {mode!r}")
        self.mode, self.seed, self.names = mode, seed, dict(names)

    def init_state(self, state: dict[str, Any], local: torch.Tensor, like: torch.Tensor | None = None) -> None:
        """Add this rule's state for a weight whose held part is ``local``; ``like``: the tensor to shape the
        compensation buffer after, when the optimizer keeps its state as the parameter itself (a DTensor)."""
        if self.mode == "stochastic":
            state["rounds"] = torch.tensor(0, dtype=torch.int64)
        elif self.mode == "kahan":
            state["kahan_comp"] = torch.zeros_like(local if like is None else like, dtype=local.dtype)

    @torch.no_grad()
    def add_(
        self,
        p: torch.Tensor,
        local: torch.Tensor,
        state: dict[str, Any],
        delta: torch.Tensor,
        *,
        start: int = 0,
        shape: torch.Size | tuple[int, ...] | None = None,
        fragment: FlatFragment | None = None,
        pieces: list[tuple[torch.Tensor, FlatFragment]] | None = None,
    ) -> None:
        """``local <- round(local + delta)``: ``local`` is the part of parameter ``p`` this rank holds (rows
        ``[start, ...)`` of ``p``'s whole ``shape``, or with ``fragment`` that flat piece of ``p``'s row-major
        flattening, as DeepSpeed ZeRO partitions), ``delta`` an fp32 tensor of its shape; with ``pieces``, ``local``
        is a flat partition holding those pieces of several weights (:meth:`add_flat_`). The rule's state is made
        on first use if the optimizer did not make it with its own (:meth:`init_state`)."""
        if not ROUND_STATE_KEYS & state.keys():
            self.init_state(state, local)
        if self.mode == "nearest":
            local.copy_(local.float().add_(delta))
        elif self.mode == "kahan":
            comp = sharding.local(state["kahan_comp"])
            comp.add_(delta)  # computed in fp32, rounded once into the bf16 buffer
            before = local.clone()
            local.add_(comp)
            comp.add_(before.sub_(local))  # what this rounding lost, kept for the next step
        else:
            count = int(state["rounds"])
            if pieces is not None:  # each piece its weight's bits; the partition's padding (no weight's) truncated
                bits = torch.zeros(local.shape, dtype=torch.int32, device=local.device)
                for q, frag in pieces:
                    if frag.numel:
                        frag.view(bits).copy_(self._fragment_bits(q, frag, count, local.device))
            elif fragment is not None:
                bits = self._fragment_bits(p, fragment, count, local.device)
            else:
                bits = random_bits(
                    name=self.names[p],
                    seed=self.seed,
                    count=count,
                    start=start,
                    rows=local.shape[0] if local.dim() else 1,
                    shape=tuple(p.shape) if shape is None else tuple(shape),
                    device=local.device,
                )
            exact = local.float().add_(delta)
            local.copy_(stochastic_round(exact, bits.reshape(local.shape)))
            state["rounds"] += 1

    def add_flat_(
        self,
        flat: torch.Tensor,
        state: dict[str, Any],
        delta: torch.Tensor,
        pieces: list[tuple[torch.Tensor, FlatFragment]],
    ) -> None:
        """``flat <- round(flat + delta)`` for a flat partition DeepSpeed ZeRO hands an element-wise optimizer
        (``bf16.bf16_master_weights_and_grads``): ``pieces`` are the model parameters it holds pieces of
        (:func:`~megatron_pept.distributed.deepspeed_backend.zero_layout`). Each piece gets the bits its weight's
        elements get on any other layout. One ``rounds`` count for the partition: its pieces are all stepped
        together, as each weight is on one process."""
        self.add_(flat, flat, state, delta, pieces=pieces)

    def _fragment_bits(self, p: torch.Tensor, frag: FlatFragment, count: int, device: Any) -> torch.Tensor:
        """The bits of elements ``[lo, hi)`` of weight ``p``'s row-major flattening (1-D), drawn as the whole rows
        of the seeded draw they fall in (a 1-D weight's rows are its elements)."""
        width = max(1, frag.shape[1:].numel())
        first, last = frag.lo // width, -(-frag.hi // width)
        rows = random_bits(
            name=self.names[p],
            seed=self.seed,
            count=count,
            start=first,
            rows=last - first,
            shape=tuple(frag.shape),
            device=device,
        )
        return rows.reshape(-1).narrow(0, frag.lo - first * width, frag.numel)


def attach_weight_update(optimizer: Any, update: WeightUpdate) -> None:
    """Make ``optimizer`` (built for bf16 weights) round its updates by ``update``; one line naming the optimizer
    if it cannot (an optimizer that steps weights in place in their own dtype would round every update to
    nearest behind the setting's back)."""
    if not hasattr(type(optimizer), "weight_update"):
        raise ValueError(
            f"{type(optimizer).__name__} cannot step weights held in bf16 (train.param_dtype=bf16): it applies "
            "its updates in the weights' own dtype; use train.param_dtype=fp32 with this method"
        )
    optimizer.weight_update = update


__all__ = [
    "ROUND_STATE_KEYS",
    "attach_weight_update",
    "WEIGHT_UPDATES",
    "WeightUpdate",
    "random_bits",
    "stochastic_round",
]
