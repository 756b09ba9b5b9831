"""Whether a plan fits a GPU, and the largest micro-batch that does.

A plan counts the bytes of live tensors, which is what the CUDA caching allocator's ``max_memory_allocated``
reports. A GPU needs more than that; the allowance (:func:`allowance_bytes`) is:

* :data:`CUDA_CONTEXT_GB` for what the process holds outside the allocator: the CUDA context, the kernels' code
  and the cuBLAS/cuDNN workspaces (about 0.5-1 GB on an H100 with CUDA 12);
* :data:`NCCL_GB` more on more than one rank: NCCL's communication buffers and its own CUDA context share;
* :data:`FRAGMENTATION` of the planned peak: the caching allocator rounds each block up (512 bytes, 2 MB
  segments for large ones) and cannot always reuse a freed block for a larger tensor (``max_memory_reserved``
  runs 5-15% above ``max_memory_allocated`` in training loops).

These are estimates, not measurements of this stack on a GPU: the GPU acceptance check (``megatron-pept-gpu-check``)
prints the planner's figure beside each peak it measures, so the first GPU run measures them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from megatron_pept import registry
from megatron_pept.config import Config, to_dict
from megatron_pept.plan.planner import GIB, Plan, accumulation_steps

CUDA_CONTEXT_GB = 1.0
NCCL_GB = 0.5
FRAGMENTATION = 0.10


def allowance_bytes(plan: Plan) -> int:
    """Bytes a GPU needs beyond the plan's peak (see the module docstring)."""
    fixed = CUDA_CONTEXT_GB + (NCCL_GB if plan.settings.get("ranks", 1) > 1 else 0.0)
    return int(fixed * GIB + FRAGMENTATION * plan.peak_bytes)


def fits(plan: Plan, gpu_gb: float) -> bool:
    return plan.peak_bytes + allowance_bytes(plan) <= gpu_gb * GIB


def usable_peak_bytes(gpu_gb: float, *, ranks: int) -> int:
    """The largest planned peak that fits ``gpu_gb`` with the allowance."""
    fixed = CUDA_CONTEXT_GB + (NCCL_GB if ranks > 1 else 0.0)
    return int((gpu_gb - fixed) * GIB / (1 + FRAGMENTATION))


@dataclass
class MicroBatchFit:
    micro_batch_size: int
    """The largest micro-batch that fits (0: none, not even 1)."""
    plan: Plan | None
    """Its plan (None when none fits)."""
    tried: dict[int, int]
    """Micro-batch -> planned peak bytes, for each one planned."""


def with_micro_batch(cfg: Config, micro_batch_size: int, *, ranks: int) -> Config:
    """``cfg`` with another micro-batch and as many micro-batches per step as before."""
    raw = to_dict(cfg)
    raw["train"]["micro_batch_size"] = micro_batch_size
    raw["train"]["global_batch_size"] = micro_batch_size * ranks * accumulation_steps(cfg, ranks=ranks)
    return registry.config_from_dict(raw)


def largest_micro_batch(
    cfg: Config, *, ranks: int, gpu_gb: float, plan_fn: Callable[[Config], Plan], first: Plan | None = None
) -> MicroBatchFit:
    """The largest micro-batch whose plan fits ``gpu_gb``. The peak grows linearly in the micro-batch (weights,
    gradients and optimizer state do not depend on it; activations and temporaries are proportional): two plans
    give the line, the micro-batch where it meets the budget is planned to confirm it, and stepped down along
    the line while it does not fit."""
    budget = usable_peak_bytes(gpu_gb, ranks=ranks)
    tried: dict[int, int] = {}
    plans: dict[int, Plan] = {}

    def at(mb: int) -> Plan:
        if mb not in plans:
            plans[mb] = plan_fn(with_micro_batch(cfg, mb, ranks=ranks))
            tried[mb] = plans[mb].peak_bytes
        return plans[mb]

    m1 = cfg.train.micro_batch_size
    if first is not None:
        plans[m1], tried[m1] = first, first.peak_bytes
    if at(m1).peak_bytes > budget:
        m1 = 1
        if at(1).peak_bytes > budget:
            return MicroBatchFit(0, None, tried)
    m2 = 2 * m1
    slope = max(1.0, (at(m2).peak_bytes - at(m1).peak_bytes) / (m2 - m1))
    best = m1
    if at(m2).peak_bytes <= budget:
        best = m2
    guess = m1 + int((budget - at(m1).peak_bytes) // slope)
    for _ in range(4):
        if guess <= best or guess in plans and plans[guess].peak_bytes > budget:
            break
        peak = at(guess).peak_bytes
        if peak <= budget:
            best = guess
            break
        guess -= max(1, math.ceil((peak - budget) / slope))
    return MicroBatchFit(best, plans[best], tried)
