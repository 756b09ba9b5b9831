"""Throughput rows of the GPU check: the ``1b`` model (vocabulary 32000) in bf16 autocast, 8 x 2048 tokens per step,
for ``full``, ``galore`` and ``relora`` on the ``single`` backend and on ``fsdp2`` with one rank (the real
:class:`~megatron_pept.trainer.Trainer` in this process; for ``fsdp2`` its backend starts a one-process NCCL group
itself, as a run without a launcher does). Each run takes 3 warm-up steps, then 12 timed ones
(``Trainer.train_step``, CUDA-synchronised); tokens/s is tokens per step over the median timed step. MFU is the
trainer's own (:meth:`LlamaArgs.flops_per_token` of the dense model, for every method, over the device's dense
bf16 peak from :func:`megatron_pept.metrics.peak_tflops`).

- ``full``: target MFU >= 45% (judged on H100/H200 only).
- ``galore`` (rank 512, GaLore's 1B recipe; ``update_proj_gap`` 200): target >= 0.95x ``full``'s tokens/s on the
  same backend, *with* a projector refresh amortised over the gap. The timed steps refresh nothing (the run's
  only refresh is step 0, a warm-up step, computed with the randomized range finder to keep the check short);
  the refresh is timed on its own: one call of the optimizer's projector function (``svd_basis`` for
  ``--galore-svd full``, the method's default, or ``randomized_basis``) per distinct projected-matrix shape, on a
  Gaussian matrix on the device, times the number of matrices of that shape; that sum divided by 200 is added to
  the median timed step.
- ``relora`` at d/r = 16 (rank = hidden / 16 = 128): target >= 1.05x ``full``. One restart (merge, re-init,
  optimizer pruning) is placed inside the timed window; its step's excess over the median of the other timed
  steps is amortised over 5000 steps (``configs/relora_1b.yaml``'s ``reset_every``).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_pept.bench.gpu_check.harness import (
    _build_trainer,
    _describe_error,
    _free,
    _sync,
    _trainer_overrides,
)
from megatron_pept.bench.gpu_check.settings import GpuCheckSettings
from megatron_pept.bench.gpu_check.verdicts import Row, Target, amortised_seconds

MFU_TARGET_GPUS = ("H100", "H200")


@dataclass
class TrainingRun:
    """Wall seconds of every step of one short training run, and what is needed to turn them into rates."""

    method: str
    backend: str
    step_seconds: list[float]
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    extra: dict[str, Any] = field(default_factory=dict)


def time_training(s: GpuCheckSettings, *, method: str, backend: str, extra: tuple[str, ...], tmp: Path) -> TrainingRun:
    """Build the trainer for ``method`` on ``backend`` and time each of its ``total_steps`` steps."""
    device = torch.device(s.device)
    overrides = _trainer_overrides(
        s,
        run_dir=tmp / f"{backend}-{method}",
        model=s.model,
        method=method,
        backend=backend,
        steps=s.total_steps,
        batch=s.micro_batch,
        seq_len=s.seq_len,
        extra=extra,
    )
    trainer = _build_trainer(overrides)
    try:
        seconds = []
        for _ in range(s.total_steps):
            _sync(device)
            start = time.perf_counter()
            trainer.train_step()
            _sync(device)
            seconds.append(time.perf_counter() - start)
        run = TrainingRun(
            method=method,
            backend=backend,
            step_seconds=seconds,
            tokens_per_step=trainer.tokens_per_step,
            flops_per_token=trainer.timer.flops_per_token,
            peak_flops=trainer.timer.peak_flops,
        )
        if method == "galore":
            shapes = Counter(tuple(p.shape) for p in trainer.method.galore_targets(trainer.raw_model))
            run.extra["projected_shapes"] = shapes
            run.extra["in_run_refresh_seconds"] = trainer.method.svd_seconds  # step 0, randomized
        return run
    finally:
        trainer.close()
        del trainer
        _free(device)


@torch.no_grad()
def time_refresh(shapes: Counter, *, rank: int, svd: str, device: torch.device, repeats: int = 1) -> dict[str, Any]:
    """Seconds of one projector refresh of every projected matrix: per distinct shape, the median of ``repeats``
    timed calls of the function the GaLore optimizer refreshes with (after one untimed call that sets up the
    solver), on a Gaussian matrix on ``device``, times the number of matrices of that shape."""
    from megatron_pept.optim.projector import projection_side, randomized_basis, svd_basis

    def refresh(g: torch.Tensor, seed: int) -> torch.Tensor:
        side, r = projection_side(g.shape), min(rank, *g.shape)
        if svd == "full":
            return svd_basis(g, rank=r, side=side)
        return randomized_basis(g, rank=r, side=side, generator=torch.Generator().manual_seed(seed))

    per_shape: dict[str, float] = {}
    total = 0.0
    gen = torch.Generator().manual_seed(0)
    for i, (shape, count) in enumerate(sorted(shapes.items())):
        g = torch.randn(shape, generator=gen).to(device)
        if i == 0:
            refresh(g, seed=1_000_003)
            _sync(device)
        times = []
        for rep in range(repeats):
            _sync(device)
            start = time.perf_counter()
            refresh(g, seed=rep)
            _sync(device)
            times.append(time.perf_counter() - start)
        per_shape["x".join(map(str, shape))] = statistics.median(times)
        total += statistics.median(times) * count
    return {"svd": svd, "seconds": total, "per_matrix_seconds": per_shape, "matrices": sum(shapes.values())}


def _rates(run: TrainingRun, step_seconds: float) -> tuple[float, float]:
    tokens_per_s = run.tokens_per_step / step_seconds
    return tokens_per_s, tokens_per_s * run.flops_per_token / run.peak_flops


def _row_metrics(run: TrainingRun, s: GpuCheckSettings) -> dict[str, Any]:
    return {
        "step_seconds": run.step_seconds,
        "warmup_steps": s.warmup_steps,
        "tokens_per_step": run.tokens_per_step,
        "flops_per_token": run.flops_per_token,
        "peak_tflops": run.peak_flops / 1e12,
    }


def _full_row(row: Row, run: TrainingRun, s: GpuCheckSettings, *, judge_mfu: bool) -> None:
    timed = run.step_seconds[s.warmup_steps :]
    step = statistics.median(timed)
    tokens_per_s, mfu = _rates(run, step)
    row.metrics = {**_row_metrics(run, s), "median_step_seconds": step, "tokens_per_s": tokens_per_s, "mfu": mfu}
    row.measured = f"{tokens_per_s:,.0f} tok/s, MFU {mfu:.1%}"
    row.checks = [(Target(">=", s.mfu_target, f"MFU >= {s.mfu_target:.0%}"), mfu)]
    row.judged = judge_mfu
    row.note = f"{run.tokens_per_step} tok/step, median of {len(timed)} steps after {s.warmup_steps}"
    if not judge_mfu and not s.dry_run:
        row.note += f"; MFU target is for {'/'.join(MFU_TARGET_GPUS)}, not judged here"


def _ratio_row(
    row: Row,
    run: TrainingRun,
    s: GpuCheckSettings,
    *,
    full: TrainingRun,
    refresh: dict[str, Any] | None,
    restart_at: int,
) -> None:
    """A galore or relora row: tokens/s with its one-off cost amortised, against ``full`` on the same backend."""
    full_tokens_per_s, _ = _rates(full, statistics.median(full.step_seconds[s.warmup_steps :]))
    row.metrics = _row_metrics(run, s)
    if run.method == "galore":
        assert refresh is not None
        step = statistics.median(run.step_seconds[s.warmup_steps :])
        one_off, every = refresh["seconds"], s.galore_gap
        shapes = run.extra["projected_shapes"]
        row.metrics.update(
            refresh=refresh,
            in_run_randomized_refresh_seconds=run.extra["in_run_refresh_seconds"],
            projected_shapes={"x".join(map(str, k)): v for k, v in shapes.items()},
        )
        row.note = (
            f"rank {s.galore_rank}; {s.galore_svd}-SVD refresh {one_off:.2f} s / {every} steps "
            f"(+{one_off / every * 1e3:.1f} ms/step on {step * 1e3:.0f} ms)"
        )
        target = s.galore_target
    else:
        restart_index = restart_at - 1  # the step whose end merges and re-initialises
        others = [t for i, t in enumerate(run.step_seconds) if i >= s.warmup_steps and i != restart_index]
        step = statistics.median(others)
        one_off, every = run.step_seconds[restart_index] - step, s.relora_every
        row.metrics.update(restart_step_seconds=run.step_seconds[restart_index], restart_index=restart_index)
        row.note = (
            f"rank {s.relora_rank} (d/r=16); restart +{max(0.0, one_off):.2f} s / {every} steps "
            f"(step {step * 1e3:.0f} ms)"
        )
        target = s.relora_target
    amortised = amortised_seconds(step, one_off_seconds=one_off, every=every)
    tokens_per_s, mfu = _rates(run, amortised)
    ratio = tokens_per_s / full_tokens_per_s
    row.metrics.update(
        median_step_seconds=step,
        one_off_seconds=one_off,
        amortised_over_steps=every,
        amortised_step_seconds=amortised,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        vs_full=ratio,
    )
    row.measured = f"{ratio:.3f}x full ({tokens_per_s:,.0f} tok/s, MFU {mfu:.1%})"
    row.checks = [(Target(">=", target, f">= {target:.2f}x full"), ratio)]


def throughput_rows(s: GpuCheckSettings, *, tmp: Path, device_name: str, log: Callable[[str], None]) -> list[Row]:
    """The six throughput rows (three methods x two backends); see the module docstring for how each is timed."""
    rows: list[Row] = []
    refresh: dict[str, dict[str, Any]] = {}
    judge_mfu = any(name in device_name for name in MFU_TARGET_GPUS)
    restart_at = s.warmup_steps + s.timed_steps // 2  # reset_every: one restart, inside the timed window
    extras = {
        "full": (),
        "galore": (f"method.rank={s.galore_rank}", f"method.update_proj_gap={s.galore_gap}", "method.svd=randomized"),
        "relora": (f"method.rank={s.relora_rank}", "method.warm_start_steps=0", f"method.reset_every={restart_at}"),
    }
    for backend in s.backends:
        full: TrainingRun | None = None
        for method in ("full", "galore", "relora"):
            row = Row(id=f"throughput/{method}/{backend}", check=f"{s.model} {method}", backend=backend)
            rows.append(row)
            if method != "full" and full is None:
                row.skipped = "no full baseline on this backend"
                continue
            log(f"throughput: {method} on {backend}")
            try:
                run = time_training(s, method=method, backend=backend, extra=extras[method], tmp=tmp)
            except Exception as err:  # one broken configuration must not hide the other rows
                row.error = _describe_error(err)
                continue
            try:
                if method == "full":
                    full = run
                    _full_row(row, run, s, judge_mfu=judge_mfu)
                else:
                    assert full is not None
                    if method == "galore" and s.galore_svd not in refresh:
                        # The same matrices under either backend (one rank: the refresh gathers nothing).
                        shapes = run.extra["projected_shapes"]
                        log(f"throughput: timing a {s.galore_svd}-SVD refresh of {sum(shapes.values())} matrices")
                        refresh[s.galore_svd] = time_refresh(
                            shapes, rank=s.galore_rank, svd=s.galore_svd, device=torch.device(s.device)
                        )
                    _ratio_row(row, run, s, full=full, refresh=refresh.get(s.galore_svd), restart_at=restart_at)
            except Exception as err:
                row.error = _describe_error(err)
    return rows
