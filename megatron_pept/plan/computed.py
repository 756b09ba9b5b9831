"""Plans for the backends that cannot run on fake tensors, computed from a one-process fake-tensor plan of the same
per-rank work (micro-batch, accumulation, method, optimizer, dtypes).

* ``ddp``: DistributedDataParallel's C++ reducer reads its buckets' memory while wrapping and in forward, which
  fake tensors do not have. A DDP rank holds what one process holds, plus the reducer's gradient buckets: a
  second copy of every trainable gradient, in the gradients' dtype, for the whole run (DDP's default
  ``gradient_as_bucket_view=False``, which this stack keeps). With per-layer updates the model is not wrapped (each
  gradient is all-reduced in place in its hook) and a rank holds exactly the one-process plan.
* ``deepspeed``: DeepSpeed's engine and ZeRO optimizers allocate and read real memory while they partition.
  ZeRO's partitioning (Rajbhandari et al., 2020, section 5) is applied to the one-process plan's parts, with the
  buffers DeepSpeed allocates from the run's DeepSpeed config (this stack's generated one, with
  ``parallel.deepspeed_config`` merged over it; DeepSpeed's defaults for keys neither sets):

  - weights: in DeepSpeed's bf16 mode (a run computing in bf16) the module is held in bf16, 2 bytes a
    parameter, else as planned; ZeRO-3 partitions them (1/N), and a rank also holds the parameters it has
    gathered (``stage3_max_live_parameters`` at most, and at least the largest block's);
  - the master: fp32 (bf16 with ``train.param_dtype=bf16``) copies of this rank's 1/N of the trainable parameters;
  - gradients: the trainable parameters' gradients in the module's dtype, whole at ZeRO-1 and 1/N at ZeRO-2 and
    -3, and this rank's 1/N in the master's dtype for the optimizer;
  - optimizer state: the one-process plan's largest, 1/N (ZeRO-1, -2 and -3 all partition it);
  - communication: the gradient bucket, ``reduce_bucket_size`` elements (5e8 by default: 2 GB in fp32, whatever the
    model's size), two with ``overlap_comm``, in fp32 at ZeRO-1 and the module's dtype at ZeRO-2 and -3
    (measured on 2 gloo ranks: docs/benchmarks.md);
  - activations and temporaries: the one-process plan's, at its peak.

  The parts are added as if all were live at once (gradients and activations overlap only during backward): an
  upper bound, which the output says.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megatron_pept import registry
from megatron_pept.config import Config, to_dict
from megatron_pept.errors import ConfigError
from megatron_pept.plan.planner import GIB, PART_NAMES, PhasePeak, Plan, _plan_fake, accumulation_steps

DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
}
"""DeepSpeed's defaults (elements) for the ZeRO buffer sizes this plan counts (deepspeed.runtime.zero.config)."""


def one_process_config(cfg: Config, *, ranks: int) -> Config:
    """``cfg`` as one process doing one rank's share: the same micro-batch and accumulation, backend ``single``."""
    t = cfg.train
    per_step = t.micro_batch_size * ranks
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x {ranks} data-parallel ranks; use a multiple of {per_step}"
        )
    raw = to_dict(cfg)
    raw["parallel"]["backend"] = "single"
    raw["train"]["global_batch_size"] = t.global_batch_size // ranks
    return registry.config_from_dict(raw)


def _with(base: Plan, *, how: str, settings: dict[str, Any], add: dict[str, int], notes: list[str]) -> Plan:
    """``base`` with bytes added to parts, in every phase and at the peak."""

    def plus(parts: dict[str, int]) -> dict[str, int]:
        return {name: parts.get(name, 0) + add.get(name, 0) for name in PART_NAMES}

    extra = sum(add.values())
    phases = [PhasePeak(p.phase, p.step, p.peak_bytes + extra, plus(p.parts)) for p in base.phases]
    return dataclasses.replace(
        base,
        settings=settings,
        how=how,
        peak_bytes=base.peak_bytes + extra,
        parts=plus(base.parts),
        largest=plus(base.largest),
        phases=phases,
        notes=[*base.notes, *notes],
    )


def plan_ddp(cfg: Config, *, ranks: int) -> Plan:
    base = _plan_fake(one_process_config(cfg, ranks=ranks), ranks=1, world=False)
    settings = {**base.settings, "backend": "ddp", "ranks": ranks}
    if cfg.optim.per_layer:
        return _with(
            base,
            how=base.how + "; DDP with per-layer updates wraps nothing (each gradient is all-reduced in place): "
            "one rank holds what one process does",
            settings=settings,
            add={},
            notes=[],
        )
    buckets = base.trainable_grad_bytes
    return _with(
        base,
        how=base.how + " on one process, plus DDP's gradient buckets (computed: DDP cannot run on fake tensors)",
        settings=settings,
        add={"other": buckets},
        notes=[f"DDP's gradient buckets: {buckets / GIB:.2f} GB (a copy of every trainable gradient), under other"],
    )


def deepspeed_settings(cfg: Config, *, ranks: int) -> dict[str, Any]:
    """The DeepSpeed config a run of ``cfg`` on ``ranks`` ranks gets, on CUDA."""
    from megatron_pept.distributed.deepspeed_backend import _merge, deepspeed_config, read_deepspeed_extra

    accum = accumulation_steps(cfg, ranks=ranks)
    ds = deepspeed_config(cfg, grad_accum_steps=accum, world_size=ranks, cuda=True)
    if cfg.parallel.deepspeed_config:
        ds = _merge(ds, read_deepspeed_extra(cfg.parallel.deepspeed_config))
    return ds


def plan_zero(cfg: Config, *, ranks: int) -> Plan:
    stage = cfg.parallel.zero_stage
    base = _plan_fake(one_process_config(cfg, ranks=ranks), ranks=1, world=False)
    ds = deepspeed_settings(cfg, ranks=ranks)
    zero = {**DEEPSPEED_DEFAULTS, **ds.get("zero_optimization", {})}
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    module_bytes = 2 if bf16 else base.param_bytes_each
    master_bytes = 2 if cfg.train.param_dtype == "bf16" else 4
    n, psi_t, psi = ranks, base.trainable_params, base.params
    frozen = max(0, base.parts["weights"] - psi_t * base.param_bytes_each)
    weights = psi_t * module_bytes + frozen
    if stage == 3:
        live = min(int(zero["stage3_max_live_parameters"]), psi)
        gathered = max(base.largest_block_params, min(live, int(zero["stage3_prefetch_bucket_size"])))
        weights = math.ceil(weights / n) + gathered * module_bytes
    master = math.ceil(psi_t / n) * master_bytes
    grads = (psi_t * module_bytes if stage == 1 else math.ceil(psi_t / n) * module_bytes) + master
    optimizer = math.ceil(base.largest["optimizer"] / n)
    # The gradient bucket DeepSpeed allocates whole whatever the model's size (contiguous_gradients), two with
    # overlap_comm (its default at ZeRO-3); ZeRO-1 stages it in fp32, ZeRO-2 and -3 in the module's dtype.
    buckets = 2 if zero.get("overlap_comm", stage == 3) else 1
    comm = int(zero["reduce_bucket_size"]) * buckets * (4 if stage == 1 else module_bytes)
    activations = base.parts["activations"]
    temporaries = base.parts["temporaries"]
    parts = {
        "weights": weights + master,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "temporaries": temporaries,
        "other": comm + base.parts["other"],
    }
    peak = sum(parts.values())
    return dataclasses.replace(
        base,
        settings={**base.settings, "backend": "deepspeed", "zero_stage": stage, "ranks": ranks},
        how=(
            f"computed: ZeRO-{stage}'s partitioning over {n} ranks applied to a one-process fake-tensor plan "
            "(DeepSpeed cannot run on fake tensors); the parts are added as if all were live at once (an upper bound)"
        ),
        peak_bytes=peak,
        peak_phase="backward (computed)",
        parts=parts,
        largest=dict(parts),
        phases=[PhasePeak("backward (computed)", None, peak, dict(parts))],
        notes=[
            *base.notes,
            f"DeepSpeed {'bf16' if bf16 else 'fp32'} module ({module_bytes} bytes a parameter), "
            f"{'bf16' if master_bytes == 2 else 'fp32'} master and optimizer partitions of 1/{n}",
            f"gradient bucket under other: {comm / GIB:.2f} GB ({buckets} x reduce_bucket_size="
            f"{int(zero['reduce_bucket_size']):.0e} elements; set parallel.deepspeed_config's zero_optimization."
            "reduce_bucket_size lower for a small model)",
        ],
    )
