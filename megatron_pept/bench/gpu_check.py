"""GPU acceptance check behind ``tools/gpu_check.py``: one table of the figures the project promises on one CUDA
device, each next to its target and a PASS/FAIL/SKIP verdict.

Rows (real mode; the shapes are :class:`GpuCheckSettings`' defaults):

* **Throughput** of the ``1b`` model (vocabulary 32000) in bf16 autocast, 8 x 2048 tokens per step, for ``full``,
  ``galore`` and ``relora`` on the ``single`` backend and on ``fsdp2`` with one rank (the real
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

* **Attention kernels**: logits of the ``flash`` and ``te`` backends against ``sdpa`` on the same weights and batch
  (the ``1b`` model, one sequence of 2048 tokens, bf16 autocast; the same model object with its attention kernels
  swapped). Pass bound: twice the bf16 error of ``sdpa`` itself (its bf16 logits against its fp32 logits), and at
  least 2 bf16 ulps of the largest logit. The kernels are also compared directly on unit-normal q/k/v (same bound
  against the fp32 ``sdpa`` output), which a masking or layout bug cannot pass. A package that is not installed is
  a SKIP row saying so.
* **galore_8bit**: the ``60m`` model trained 4 steps on one batch by ``galore`` (fp32 moments) and by
  ``galore_8bit`` (bitsandbytes' blockwise 8-bit moments, quantised by its CUDA kernels on a GPU), from the same
  weights. Passes if the 8-bit run's total weight change has cosine >= 0.98 with the fp32 run's, a norm within
  10% of it, lowers the loss, and holds uint8 state tensors on the device.
* **Memory**: ``torch.cuda.max_memory_allocated`` over two steps of the ``7b`` model with ``galore_8bit`` (rank
  1024, GaLore's 7B recipe), per-layer weight updates (``optim.per_layer=true``) and activation checkpointing,
  batch 1 x 256 tokens (GaLore's sequence length), the first step computing every projector (randomized range
  finder, to keep the check short: a full SVD of all 224 7B matrices is expected to take minutes). Target < 22 GB
  (1e9 bytes). The stack keeps fp32 master weights, 27 GB for 7B, so this row is expected to fail until weights
  can be kept in bf16.

``--dry-run`` runs the same functions on CPU with the ``debug`` model and a few tiny steps: every row is produced
the same way, targets are shown but not judged ("dry"), kernels that are not installed are SKIP rows, the memory
row is the process's peak RSS. It checks the plumbing, not the numbers.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from megatron_pept.errors import ConfigError

GB = 1e9
PASS, FAIL, SKIP, DRY = "PASS", "FAIL", "SKIP", "dry"
NO_CUDA_LINE = "gpu_check: no CUDA device; skipped (use --dry-run to check the plumbing on CPU)"
CHECK_GROUPS = ("memory", "galore_8bit", "attention", "throughput")
"""Row groups, in the order they run (memory first, while nothing else holds device memory)."""
MFU_TARGET_GPUS = ("H100", "H200")
ATTENTION_PACKAGES = {"flash": "flash_attn", "te": "transformer_engine"}
BF16_EPS = torch.finfo(torch.bfloat16).eps


# -- targets and verdicts (pure) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A bound on one measured value; ``text`` is how the table shows it."""

    op: str
    bound: float
    text: str

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.op == ">=":
            return value >= self.bound
        if self.op == ">":
            return value > self.bound
        if self.op == "<=":
            return value <= self.bound
        if self.op == "<":
            return value < self.bound
        raise AssertionError(f"unknown comparison {self.op!r}")


@dataclass
class Row:
    """One line of the table: what was measured, the targets it is judged by, and the verdict."""

    id: str
    check: str
    backend: str = "-"
    measured: str = ""
    checks: list[tuple[Target, float]] = field(default_factory=list)
    """(target, value) pairs; the row passes when every one is met."""
    judged: bool = True
    """False where the target does not apply here (e.g. the MFU target on a GPU other than H100/H200)."""
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    status: str = ""

    @property
    def target_text(self) -> str:
        return ", ".join(t.text for t, _ in self.checks) or "-"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "check": self.check,
            "backend": self.backend,
            "measured": self.measured,
            "target": self.target_text,
            "status": self.status,
            "note": self.note,
            "checks": [
                {"op": t.op, "bound": t.bound, "text": t.text, "value": v, "met": t.met(v)} for t, v in self.checks
            ],
            "judged": self.judged,
            "metrics": self.metrics,
            "skipped": self.skipped,
            "error": self.error,
        }


def resolve_status(row: Row, *, dry: bool) -> str:
    """PASS/FAIL/SKIP (or ``dry``) of a row. An error or a non-finite measured value always FAILs, in a dry run
    too (the plumbing is broken); a dry run judges nothing else."""
    if row.error is not None:
        return FAIL
    if row.skipped is not None:
        return SKIP
    if not row.checks or any(not math.isfinite(v) for _, v in row.checks):
        return FAIL
    if dry:
        return DRY
    if not row.judged:
        return SKIP
    return PASS if all(t.met(v) for t, v in row.checks) else FAIL


def exit_code(rows: list[Row]) -> int:
    """1 when any row FAILs, else 0."""
    return 1 if any(r.status == FAIL for r in rows) else 0


def bf16_bound(noise: float, scale: float) -> float:
    """Pass bound of a bf16 result against a reference: twice the reference's own bf16 error ``noise``, at least two
    bf16 ulps of the largest magnitude ``scale`` (so one rounding flip of a large value is never a failure)."""
    return max(2.0 * noise, 2.0 * BF16_EPS * scale)


def amortised_seconds(step_seconds: float, *, one_off_seconds: float, every: int) -> float:
    """Seconds per step when a one-off cost (a projector refresh, a restart) recurs every ``every`` steps."""
    return step_seconds + max(0.0, one_off_seconds) / every


# -- settings ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuCheckSettings:
    """Everything the check runs; the defaults are the real (GPU) check, :meth:`for_dry_run` the CPU one."""

    dry_run: bool = False
    device: str = "cuda"
    dtype: str = "bf16"
    data: str = "data/generated/quickstart"
    """Token shards the training runs read (the built-in quickstart data, made there when missing); relative to the
    current directory."""
    groups: tuple[str, ...] = CHECK_GROUPS
    threads: int | None = None
    """torch.set_num_threads for the run (the dry run uses 1: tiny ops on a shared CPU are fastest single-threaded,
    and LAPACK with two contended threads can take 1000x longer)."""
    vocab_size: int = 32000
    # throughput
    model: str = "1b"
    seq_len: int = 2048
    micro_batch: int = 8
    warmup_steps: int = 3
    timed_steps: int = 12
    backends: tuple[str, ...] = ("single", "fsdp2")
    galore_rank: int = 512
    galore_gap: int = 200
    galore_svd: str = "full"
    """Projector function whose refresh time is amortised over ``galore_gap`` (the method's default is full)."""
    relora_every: int = 5000
    """Steps between ReLoRA restarts the restart cost is amortised over (configs/relora_1b.yaml)."""
    mfu_target: float = 0.45
    galore_target: float = 0.95
    relora_target: float = 1.05
    # attention kernels
    attention_batch: int = 1
    attention_seq_len: int = 2048
    # galore_8bit
    bnb_model: str = "60m"
    bnb_rank: int = 128
    bnb_steps: int = 4
    bnb_batch: int = 4
    bnb_seq_len: int = 256
    bnb_min_cosine: float = 0.98
    bnb_max_norm_gap: float = 0.1
    # memory
    mem_model: str = "7b"
    mem_rank: int = 1024
    mem_batch: int = 1
    mem_seq_len: int = 256
    mem_steps: int = 2
    mem_activation_checkpointing: bool = True
    mem_target_gb: float = 22.0

    @classmethod
    def for_dry_run(cls, **overrides: Any) -> GpuCheckSettings:
        """The same check on CPU with tiny shapes (the ``debug`` model, a few steps), to test the plumbing."""
        tiny: dict[str, Any] = dict(
            dry_run=True,
            device="cpu",
            threads=1,
            vocab_size=1024,
            model="debug",
            seq_len=32,
            micro_batch=2,
            warmup_steps=1,
            timed_steps=2,
            galore_rank=16,
            attention_seq_len=32,
            bnb_model="debug",
            bnb_rank=64,  # 64 x 64 projected moments: the smallest that bitsandbytes' 8-bit path takes
            bnb_steps=3,
            bnb_batch=2,
            bnb_seq_len=32,
            mem_model="debug",
            mem_rank=16,
            mem_seq_len=32,
        )
        return cls(**{**tiny, **overrides})

    @property
    def relora_rank(self) -> int:
        from megatron_pept.models import MODEL_SHAPES

        return max(1, MODEL_SHAPES[self.model]["hidden_size"] // 16)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line, with the fix) for settings the check cannot run."""
        unknown = [g for g in self.groups if g not in CHECK_GROUPS]
        if unknown:
            raise ConfigError(f"unknown check group {', '.join(unknown)}; choose from {', '.join(CHECK_GROUPS)}")
        if self.warmup_steps < 1:
            raise ConfigError(f"--warmup must be at least 1 (the first step is never timed), got {self.warmup_steps}")
        if self.timed_steps < 2:
            raise ConfigError(f"--steps must be at least 2 (ReLoRA times one restart step), got {self.timed_steps}")
        if self.total_steps >= self.galore_gap:
            raise ConfigError(
                f"--warmup + --steps ({self.total_steps}) must stay below the GaLore gap {self.galore_gap}, so no "
                "timed step refreshes a projector"
            )
        for name, minimum in (("seq_len", 2), ("attention_seq_len", 2), ("mem_seq_len", 2), ("micro_batch", 1)):
            if getattr(self, name) < minimum:
                option = {"seq_len": "--seq-len", "attention_seq_len": "--seq-len", "micro_batch": "--micro-batch"}
                raise ConfigError(f"{option.get(name, name)} must be at least {minimum}, got {getattr(self, name)}")
        if self.galore_svd not in ("full", "randomized"):
            raise ConfigError(f"--galore-svd must be full or randomized, got {self.galore_svd!r}")


# -- helpers -------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _installed(module: str) -> bool:
    # find_spec of a top-level name does not import it (transformer-engine raises on import without CUDA).
    return importlib.util.find_spec(module) is not None


def _data_path(s: GpuCheckSettings) -> Path:
    return Path(s.data).resolve()  # a relative path is relative to the current directory, as for every tool


def _trainer_overrides(
    s: GpuCheckSettings,
    *,
    run_dir: Path,
    model: str,
    method: str,
    backend: str,
    steps: int,
    batch: int,
    seq_len: int,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A short run: one micro-batch per step, no validation, no checkpoints, no TensorBoard."""
    return [
        f"run_dir={run_dir}",
        f"model.name={model}",
        f"model.vocab_size={s.vocab_size}",
        f"data.path={_data_path(s)}",
        f"data.seq_len={seq_len}",
        f"train.steps={steps}",
        f"train.global_batch_size={batch}",
        f"train.micro_batch_size={batch}",
        f"train.dtype={s.dtype}",
        f"train.device={s.device}",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "train.eval_batches=1",
        "metrics.tensorboard=false",
        "checkpoint.interval=0",
        "checkpoint.save_on_signal=false",
        f"method.name={method}",
        f"parallel.backend={backend}",
        *extra,
    ]


def _build_trainer(overrides: list[str]) -> Any:
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    return Trainer(load_config(None, overrides))


def _materialised(model_name: str, *, vocab_size: int, max_seq_len: int, device: torch.device) -> Any:
    from megatron_pept.config import ModelConfig
    from megatron_pept.models import build_model, llama_args

    model = build_model(llama_args(ModelConfig(name=model_name), vocab_size=vocab_size, max_seq_len=max_seq_len))
    model.to_empty(device=device)
    model.init_weights(generator=torch.Generator(device=device).manual_seed(0))
    return model


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- throughput ----------------------------------------------------------------------------------------------------


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


# -- attention kernels ---------------------------------------------------------------------------------------------


def _swap_cores(model: Any, backend: str) -> list[Any]:
    """Give every attention layer a ``backend`` kernel; returns the kernels it had, for :func:`_restore_cores`."""
    from megatron_pept.models.attention import build_core_attention

    args = model.args
    old = []
    for layer in model.model.layers.values():
        old.append(layer.self_attn.core)
        core = build_core_attention(
            backend, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim
        )
        layer.self_attn.core = core.to(model.lm_head.weight.device)
    return old


def _restore_cores(model: Any, cores: list[Any]) -> None:
    for layer, core in zip(model.model.layers.values(), cores):
        layer.self_attn.core = core


@torch.no_grad()
def attention_references(model: Any, input_ids: torch.Tensor, *, dtype: str) -> dict[str, Any]:
    """What the other kernels are compared with: ``sdpa`` logits in ``dtype`` and in fp32, the same for one
    attention call on unit-normal q/k/v, and the bf16 error of each."""
    device = input_ids.device
    logits32 = model(input_ids).float()
    with _autocast(device, dtype):
        logits = model(input_ids).float()
    args = model.args
    b, s = input_ids.shape
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(b, s, heads, args.head_dim, generator=gen).to(device)
        for heads in (args.num_heads, args.num_kv_heads, args.num_kv_heads)
    )
    core = model.model.layers["0"].self_attn.core
    kernel32 = core(q, k, v).float()
    low = torch.bfloat16 if dtype == "bf16" else torch.float32
    qkv = tuple(t.to(low) for t in (q, k, v))
    kernel = core(*qkv).float()
    return {
        "logits": logits,
        "logits32": logits32,
        "logits_noise": (logits - logits32).abs().max().item(),
        "qkv": qkv,
        "kernel32": kernel32,
        "kernel_noise": (kernel - kernel32).abs().max().item(),
    }


@torch.no_grad()
def compare_attention_backend(
    model: Any, input_ids: torch.Tensor, *, backend: str, refs: dict[str, Any], dtype: str
) -> dict[str, float]:
    """Largest absolute differences of ``backend``'s logits from ``sdpa``'s (same model, same batch, same
    ``dtype``) and of its kernel output from fp32 ``sdpa``'s, with the bf16 pass bounds of each."""
    old = _swap_cores(model, backend)
    try:
        with _autocast(input_ids.device, dtype):
            logits = model(input_ids).float()
        kernel = model.model.layers["0"].self_attn.core(*refs["qkv"]).float()
    finally:
        _restore_cores(model, old)
    return {
        "logits_max_abs_diff": (logits - refs["logits"]).abs().max().item(),
        "logits_bound": bf16_bound(refs["logits_noise"], refs["logits32"].abs().max().item()),
        "logits_sdpa_bf16_error": refs["logits_noise"],
        "kernel_max_abs_diff": (kernel - refs["kernel32"]).abs().max().item(),
        "kernel_bound": bf16_bound(refs["kernel_noise"], refs["kernel32"].abs().max().item()),
        "kernel_sdpa_bf16_error": refs["kernel_noise"],
    }


def attention_rows(s: GpuCheckSettings, *, log: Callable[[str], None]) -> list[Row]:
    device = torch.device(s.device)
    rows = [
        Row(id=f"attention/{backend}", check=f"attention {backend} vs sdpa", backend="-")
        for backend in ATTENTION_PACKAGES
    ]
    missing = {b: not _installed(m) for b, m in ATTENTION_PACKAGES.items()}
    for row, backend in zip(rows, ATTENTION_PACKAGES):
        if missing[backend]:
            row.skipped = f"not installed ({ATTENTION_PACKAGES[backend]}; pip install 'megatron_pept[gpu]')"
            row.measured = "not installed"
    if all(missing.values()):
        return rows
    log("attention: sdpa references")
    model = None
    try:
        model = _materialised(s.model, vocab_size=s.vocab_size, max_seq_len=s.attention_seq_len, device=device)
        model.eval()
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, s.vocab_size, (s.attention_batch, s.attention_seq_len), generator=gen).to(device)
        refs = attention_references(model, ids, dtype=s.dtype)
    except Exception as err:
        error = _describe_error(err)
        for row, backend in zip(rows, ATTENTION_PACKAGES):
            row.error = None if missing[backend] else f"sdpa reference: {error}"
        del model
        _free(device)
        return rows
    try:
        for row, backend in zip(rows, ATTENTION_PACKAGES):
            if missing[backend]:
                continue
            log(f"attention: {backend}")
            try:
                result = compare_attention_backend(model, ids, backend=backend, refs=refs, dtype=s.dtype)
            except Exception as err:
                if s.dry_run:  # installed but unusable on CPU (flash-attn needs CUDA): nothing to check here
                    row.skipped = f"cannot run on CPU: {_describe_error(err)}"
                    row.measured = "needs CUDA"
                else:
                    row.error = _describe_error(err)
                continue
            row.metrics = result
            row.measured = (
                f"logits max|diff| {result['logits_max_abs_diff']:.3g} (kernel {result['kernel_max_abs_diff']:.3g})"
            )
            logits_target = Target("<=", result["logits_bound"], f"logits <= {result['logits_bound']:.3g}")
            kernel_target = Target("<=", result["kernel_bound"], f"kernel <= {result['kernel_bound']:.3g}")
            row.checks = [
                (logits_target, result["logits_max_abs_diff"]),
                (kernel_target, result["kernel_max_abs_diff"]),
            ]
            row.note = (
                f"{s.model}, {s.attention_batch}x{s.attention_seq_len} tokens, {s.dtype}; bound 2x sdpa's own bf16 "
                f"error ({result['logits_sdpa_bf16_error']:.3g} logits, {result['kernel_sdpa_bf16_error']:.3g} kernel)"
            )
    finally:
        del model
        _free(device)
    return rows


# -- galore_8bit ---------------------------------------------------------------------------------------------------


def _train_fixed_batch(s: GpuCheckSettings, method_name: str, input_ids: torch.Tensor) -> dict[str, Any]:
    """``bnb_steps`` optimizer steps of ``method_name`` on one batch, from the seed-0 weights; the weight change."""
    from megatron_pept.config import MethodConfig, OptimConfig
    from megatron_pept.methods import build_method
    from megatron_pept.models.loss import cross_entropy_loss

    device = input_ids.device
    model = _materialised(s.bnb_model, vocab_size=s.vocab_size, max_seq_len=s.bnb_seq_len, device=device)
    start = [p.detach().clone() for p in model.parameters()]
    method = build_method(
        MethodConfig(name=method_name, rank=s.bnb_rank, update_proj_gap=10 * s.bnb_steps),
        optim_cfg=OptimConfig(lr=1e-3),
        total_steps=s.bnb_steps,
    )
    optimizer = method.build_optimizer(model)
    losses = []
    for _ in range(s.bnb_steps):
        with _autocast(device, s.dtype):
            loss = cross_entropy_loss(model(input_ids[:, :-1]), input_ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad(), _autocast(device, s.dtype):
        losses.append(cross_entropy_loss(model(input_ids[:, :-1]), input_ids[:, 1:]).item())
    delta = torch.cat([(p.detach() - p0).flatten().double() for p, p0 in zip(model.parameters(), start)])
    states = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    uint8_on_device = sum(1 for v in states if v.dtype == torch.uint8 and v.device.type == device.type)
    return {"losses": losses, "delta": delta, "uint8_states_on_device": uint8_on_device}


def galore_8bit_row(s: GpuCheckSettings, *, log: Callable[[str], None]) -> Row:
    device = torch.device(s.device)
    row = Row(id="galore_8bit/step", check=f"galore_8bit step ({device.type})", backend="single")
    if not _installed("bitsandbytes"):
        row.skipped = "bitsandbytes not installed (pip install 'megatron_pept[quant]')"
        row.measured = "not installed"
        return row
    log("galore_8bit: against galore with fp32 moments")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, s.vocab_size, (s.bnb_batch, s.bnb_seq_len + 1), generator=gen).to(device)
    try:
        ref = _train_fixed_batch(s, "galore", ids)
        q8 = _train_fixed_batch(s, "galore_8bit", ids)
    except Exception as err:
        row.error = _describe_error(err)
        return row
    finally:
        _free(device)
    a, b = q8["delta"], ref["delta"]
    cosine = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))
    norm_ratio = float(a.norm() / b.norm().clamp_min(1e-300))
    loss_drop = q8["losses"][0] - q8["losses"][-1]
    import bitsandbytes

    row.metrics = {
        "cosine": cosine,
        "norm_ratio": norm_ratio,
        "losses_8bit": q8["losses"],
        "losses_fp32": ref["losses"],
        "uint8_states_on_device": q8["uint8_states_on_device"],
        "bitsandbytes": bitsandbytes.__version__,
    }
    row.measured = f"cos {cosine:.4f}, |dW| ratio {norm_ratio:.3f}, loss {q8['losses'][0]:.3f}->{q8['losses'][-1]:.3f}"
    row.checks = [
        (Target(">=", s.bnb_min_cosine, f"cos >= {s.bnb_min_cosine}"), cosine),
        (Target("<=", s.bnb_max_norm_gap, f"|dW| ratio 1+-{s.bnb_max_norm_gap}"), abs(norm_ratio - 1.0)),
        (Target(">", 0.0, "loss falls"), loss_drop),
        (Target(">=", 1, f"uint8 state on {device.type}"), float(q8["uint8_states_on_device"])),
    ]
    row.note = (
        f"{s.bnb_model}, rank {s.bnb_rank}, {s.bnb_steps} steps on one {s.bnb_batch}x{s.bnb_seq_len} batch vs "
        f"galore fp32 moments; {q8['uint8_states_on_device']} uint8 states; bitsandbytes {bitsandbytes.__version__}"
    )
    return row


# -- memory --------------------------------------------------------------------------------------------------------


def memory_row(s: GpuCheckSettings, *, tmp: Path, log: Callable[[str], None]) -> Row:
    from megatron_pept.bench.optim import state_bytes
    from megatron_pept.bench.quant import peak_rss_bytes, reset_peak_rss

    device = torch.device(s.device)
    what = "peak CUDA memory" if device.type == "cuda" else "CPU peak RSS"
    row = Row(id="memory/galore_8bit_per_layer", check=f"{s.mem_model} galore_8bit per-layer {what}")
    if not _installed("bitsandbytes"):
        row.skipped = "bitsandbytes not installed (pip install 'megatron_pept[quant]')"
        row.measured = "not installed"
        return row
    log(f"memory: {s.mem_model} galore_8bit with per-layer updates")
    extra = (
        f"method.rank={s.mem_rank}",
        "method.svd=randomized",
        "optim.per_layer=true",
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
    }
    row.measured = f"{peak / GB:.2f} GB (weights {weights / GB:.2f} GB, optimizer state {optimizer_bytes / GB:.2f} GB)"
    row.checks = [(Target("<", s.mem_target_gb, f"< {s.mem_target_gb:g} GB"), peak / GB)]
    checkpointing = "activation checkpointing, " if s.mem_activation_checkpointing else ""
    row.note = (
        f"batch {s.mem_batch} x seq {s.mem_seq_len}, rank {s.mem_rank}, {s.mem_steps} steps (the first computes every "
        f"projector, randomized SVD), {checkpointing}fp32 master weights"
    )
    return row


# -- the whole check -------------------------------------------------------------------------------------------------


def _describe_error(err: BaseException) -> str:
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    message = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
    return f"{type(err).__name__}: {message}"[:300]


@dataclass
class GpuCheckResult:
    settings: GpuCheckSettings
    device: str
    torch_version: str
    rows: list[Row]
    seconds: float

    @property
    def exit_code(self) -> int:
        return exit_code(self.rows)

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        return {
            "mode": "dry-run" if self.settings.dry_run else "real",
            "device": self.device,
            "torch": self.torch_version,
            "settings": settings,
            "rows": [r.to_dict() for r in self.rows],
            "summary": dict(Counter(r.status for r in self.rows)),
            "exit_code": self.exit_code,
            "seconds": self.seconds,
        }


@contextlib.contextmanager
def _quiet_trainer_logs() -> Iterator[None]:
    """The trainer's INFO lines go to stderr, so stdout holds the table alone."""
    import logging

    logger = logging.getLogger("megatron_pept")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler._megatron_pept = True  # type: ignore[attr-defined]  # setup_console_logging then adds none
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers, level, logger.propagate = saved
        logger.setLevel(level)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return "cpu"


def run_gpu_check(s: GpuCheckSettings, *, log: Callable[[str], None] | None = None) -> GpuCheckResult:
    """Run every row group of ``s`` in order and judge the rows (see the module docstring)."""
    s.validate()
    start = time.perf_counter()
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the real check needs a CUDA device; use --dry-run on a CPU machine")

    def progress(message: str) -> None:
        (log or (lambda m: print(f"gpu_check [{time.perf_counter() - start:5.0f} s] {m}", file=sys.stderr)))(message)

    from megatron_pept.data.builtin import ensure_builtin_dataset
    from megatron_pept.distributed import comm

    if s.threads is not None:
        torch.set_num_threads(s.threads)

    rows: list[Row] = []
    with _quiet_trainer_logs(), tempfile.TemporaryDirectory(prefix="gpu_check") as tmp_name:
        tmp = Path(tmp_name)
        if {"memory", "throughput"} & set(s.groups):
            ensure_builtin_dataset("quickstart", _data_path(s))
        try:
            for group in CHECK_GROUPS:
                if group not in s.groups:
                    continue
                if group == "memory":
                    rows.append(memory_row(s, tmp=tmp, log=progress))
                elif group == "galore_8bit":
                    rows.append(galore_8bit_row(s, log=progress))
                elif group == "attention":
                    rows.extend(attention_rows(s, log=progress))
                else:
                    name = describe_device(device)
                    rows.extend(throughput_rows(s, tmp=tmp, device_name=name, log=progress))
        finally:
            comm.shutdown()  # the one-rank process group the fsdp2 runs started
    for row in rows:
        row.status = resolve_status(row, dry=s.dry_run)
    return GpuCheckResult(
        settings=s,
        device=describe_device(device),
        torch_version=torch.__version__,
        rows=rows,
        seconds=time.perf_counter() - start,
    )


def format_table(result: GpuCheckResult) -> str:
    """The one table: a title line, the rows, a summary line."""
    s = result.settings
    mode = "DRY RUN on CPU: plumbing only, targets not judged" if s.dry_run else "targets judged"
    title = (
        f"gpu_check ({mode}): {result.device}, torch {result.torch_version}, {s.dtype}; throughput: {s.model}, "
        f"{s.micro_batch} x {s.seq_len} tokens/step, {s.warmup_steps} warm-up + {s.timed_steps} timed steps"
    )
    header = ("check", "backend", "measured", "target", "status", "note")
    lines = []
    for r in result.rows:
        target = r.target_text
        if s.dry_run and r.checks:
            target = f"dry ({target})"
        note = r.error or r.skipped or r.note
        if r.error:
            note = f"error: {note}"
        lines.append((r.check, r.backend, r.measured or "-", target, r.status, note))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    counts = Counter(r.status for r in result.rows)
    summary = ", ".join(f"{counts[k]} {k}" for k in (PASS, FAIL, SKIP, DRY) if counts[k])
    out = [title, fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) for line in lines]
    out.append(f"{summary or 'no rows'}; {result.seconds:.0f} s; exit {result.exit_code}")
    return "\n".join(out)


def with_overrides(s: GpuCheckSettings, **changes: Any) -> GpuCheckSettings:
    """``s`` with the given fields changed (None values are ignored: options the user did not give)."""
    return replace(s, **{k: v for k, v in changes.items() if v is not None})


__all__ = [
    "CHECK_GROUPS",
    "NO_CUDA_LINE",
    "GpuCheckResult",
    "GpuCheckSettings",
    "Row",
    "Target",
    "amortised_seconds",
    "attention_references",
    "bf16_bound",
    "compare_attention_backend",
    "exit_code",
    "format_table",
    "resolve_status",
    "run_gpu_check",
    "time_refresh",
    "with_overrides",
]
