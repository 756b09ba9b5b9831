"""The memory row of the GPU check: ``torch.cuda.max_memory_allocated`` over two steps of the ``7b`` model with
``galore_8bit`` (rank 1024, GaLore's 7B recipe), per-layer weight updates (``optim.per_layer=true``) and activation
checkpointing, batch 1 x 256 tokens (GaLore's sequence length), the first step computing every projector
(randomized range finder, to keep the check short: a full SVD of all 224 7B matrices is expected to take
minutes), weights held in bf16 (``train.param_dtype=bf16``, stochastic rounding). Target < 22 GB, in GiB (2^30
bytes: as torch reports memory and GPUs are sized; the planner's unit too).

Beside the measured peak the row gives the memory planner's figure for the same run (``megatron_pept.plan``, fake
tensors, planned for this device before the run is built) and their difference, so the first GPU run measures the
planner's error on a GPU too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from megatron_pept.bench.gpu_check.harness import (
    _build_trainer,
    _describe_error,
    _free,
    _sync,
    _tensor_bytes,
    _trainer_overrides,
    skip_unless_importable,
)
from megatron_pept.bench.gpu_check.settings import GpuCheckSettings
from megatron_pept.bench.gpu_check.verdicts import Row, Target

GB = 2**30  # GiB


def memory_row(s: GpuCheckSettings, *, tmp: Path, log: Callable[[str], None]) -> Row:
    from megatron_pept.bench.optim import state_bytes
    from megatron_pept.bench.quant import peak_rss_bytes, reset_peak_rss

    device = torch.device(s.device)
    what = "peak CUDA memory" if device.type == "cuda" else "CPU peak RSS"
    row = Row(id="memory/galore_8bit_per_layer", check=f"{s.mem_model} galore_8bit per-layer {what}")
    if skip_unless_importable(row, "bitsandbytes", install="pip install 'megatron_pept[quant]'"):
        return row
    log(f"memory: {s.mem_model} galore_8bit with per-layer updates")
    extra = (
        f"method.rank={s.mem_rank}",
        "method.svd=randomized",
        "optim.per_layer=true",
        "train.param_dtype=bf16",
        f"train.activation_checkpointing={str(s.mem_activation_checkpointing).lower()}",
    )
    overrides = _trainer_overrides(
        s,
        run_dir=tmp / "memory",
        model=s.mem_model,
        method="galore_8bit",
        backend="single",
        steps=s.mem_steps,
        batch=s.mem_batch,
        seq_len=s.mem_seq_len,
        extra=extra,
    )
    planned = planned_peak_bytes(overrides, log=log)
    _free(device)
    try:
        trainer = _build_trainer(overrides)
    except Exception as err:
        row.error = _describe_error(err)
        return row
    try:
        weights = _tensor_bytes([*trainer.raw_model.parameters(), *trainer.raw_model.buffers()])
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            reset_peak_rss()
            before = peak_rss_bytes()
        for _ in range(s.mem_steps):
            trainer.train_step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
        optimizer_bytes = state_bytes(trainer.optimizer)
    except Exception as err:
        row.error = _describe_error(err)
        return row
    finally:
        trainer.close()
        del trainer
        _free(device)
    row.metrics = {
        "peak_bytes": peak,
        "before_steps_bytes": before,
        "weights_bytes": weights,
        "optimizer_state_bytes": optimizer_bytes,
        "kind": what,
        "planned_peak_bytes": planned,
        "planner_error": None if planned is None or device.type != "cuda" else (planned - peak) / peak,
    }
    plan_text = "" if planned is None else f", planned {planned / GB:.2f} GB"
    row.measured = (
        f"{peak / GB:.2f} GB (weights {weights / GB:.2f} GB, optimizer state {optimizer_bytes / GB:.2f} GB{plan_text})"
    )
    row.checks = [(Target("<", s.mem_target_gb, f"< {s.mem_target_gb:g} GB"), peak / GB)]
    checkpointing = "activation checkpointing, " if s.mem_activation_checkpointing else ""
    row.note = (
        f"batch {s.mem_batch} x seq {s.mem_seq_len}, rank {s.mem_rank}, {s.mem_steps} steps (the first computes every "
        f"projector, randomized SVD), {checkpointing}bf16 weights"
        + ("" if planned is None or device.type != "cuda" else f"; planner error {100 * (planned - peak) / peak:+.1f}%")
    )
    return row


def planned_peak_bytes(overrides: list[str], *, log: Callable[[str], None]) -> int | None:
    """The memory planner's peak for the run ``overrides`` describe (None, said in the log, if it cannot plan it:
    the row's measurement goes on)."""
    from megatron_pept.config import load_config
    from megatron_pept.plan import plan

    try:
        planned = plan(load_config(None, overrides))
    except Exception as err:  # the planner is not what this row checks
        log(f"memory: the planner could not plan this run ({_describe_error(err)})")
        return None
    log(f"memory: planned peak {planned.peak_bytes / GB:.2f} GB ({planned.peak_phase}, {planned.seconds:.0f} s)")
    return planned.peak_bytes
