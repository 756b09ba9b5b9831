"""Training metrics: TensorBoard scalars, the console line, throughput, MFU and memory."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

from megatron_pept.metrics.timing import StepRates

logger = logging.getLogger("megatron_pept")

# Dense bf16 peak TFLOP/s of one device, by a substring of torch.cuda.get_device_name().
_GPU_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),
)


def measure_matmul_tflops(*, device: torch.device, size: int = 1024, repeats: int = 8) -> float:
    """Achieved fp32 TFLOP/s of a square matmul: the reference peak for MFU on a CPU."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    elapsed = time.perf_counter() - start
    return 2 * size**3 * repeats / elapsed / 1e12


# fp32 FLOPs one core can issue per cycle, by the widest vector FMA it has (x86 flag or Arm feature), counting two
# FMA pipes; SMT siblings are counted as cores. An upper bound: real cores issue at most this many.
_CPU_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16), ("sve", 32), ("asimd", 16))
_CPU_FLOPS_DEFAULT = 8  # SSE: 4-wide multiply and add


def cpu_peak_tflops(cpuinfo: str, *, threads: int, max_freq_khz: int | None = None) -> tuple[float, str] | None:
    """Peak fp32 TFLOP/s of ``threads`` cores described by ``/proc/cpuinfo`` text: cores x clock x FLOPs per cycle
    of the widest vector FMA (two pipes). The clock is the highest of ``max_freq_khz`` (cpufreq's maximum) and the
    clocks cpuinfo lists; turbo beyond what the OS reports is not counted. Returns the peak and how it was made,
    or None when the text names no clock."""
    mhz = [float(line.split(":", 1)[1]) for line in cpuinfo.splitlines() if line.lower().startswith("cpu mhz")]
    if max_freq_khz:
        mhz.append(max_freq_khz / 1000)
    if not mhz:
        return None
    features = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")):
            features.update(line.split(":", 1)[1].split())
    name, per_cycle = next(((f, n) for f, n in _CPU_FLOPS_PER_CYCLE if f in features), ("sse", _CPU_FLOPS_DEFAULT))
    ghz = max(mhz) / 1000
    peak = threads * ghz * per_cycle / 1000
    return peak, f"{threads} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({name})"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def peak_tflops(device: torch.device, *, override: float | None = None) -> float:
    """Peak dense TFLOP/s of ``device`` for MFU: the override, a known GPU's bf16 peak, or on a CPU the larger of its
    fp32 peak from cores, clock and vector width (:func:`cpu_peak_tflops`) and a measured fp32 matmul (which covers
    a turbo clock the OS does not report), so MFU stays below 100%. For an unknown GPU, a measured matmul."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS:
            if key in name:
                return tflops
        logger.warning("unknown GPU %r: MFU uses a measured matmul peak; set metrics.peak_tflops for accuracy", name)
        return measure_matmul_tflops(device=device)
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    found = cpu_peak_tflops(
        _read("/proc/cpuinfo") or "",
        threads=torch.get_num_threads(),
        max_freq_khz=int(max_khz) if max_khz and max_khz.strip().isdigit() else None,
    )
    peak, how = found if found is not None else (0.0, "clock unknown")
    measured = measure_matmul_tflops(device=device)
    logger.info(
        "MFU reference: CPU fp32 peak %.3f TFLOP/s (%s; fp32 matmul measured %.3f)", max(peak, measured), how, measured
    )
    return max(peak, measured)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated CUDA memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kilobytes * 1024 / 1e9


def device_memory_gb(device: torch.device) -> dict[str, float]:
    """The CUDA caching allocator's state now, in GB (1e9 bytes): ``mem/allocated_gb`` (memory held by tensors) and
    ``mem/reserved_gb`` (held by the allocator, allocated or cached for reuse); nothing on a CPU."""
    if device.type != "cuda":
        return {}
    return {
        "mem/allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
        "mem/reserved_gb": torch.cuda.memory_reserved(device) / 1e9,
    }


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def setup_console_logging(*, is_main: bool) -> None:
    """One stdout handler for the package logger; non-main ranks log warnings only."""
    if any(getattr(h, "_megatron_pept", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler._megatron_pept = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


class MetricsWriter:
    """Writes scalars to TensorBoard (event files directly in ``run_dir``) on the main rank.

    A value is a float, or a 0-d tensor still on the device (a method's statistics): reading it on the host would
    make the step wait for the device, so tensors are kept, each with its step, and read together, with one
    synchronisation, by :meth:`sync` (the trainer calls it every ``train.log_interval`` steps, and :meth:`close`
    does). A tag's later floats wait behind its kept tensors, so each tag is written in step order.

    A write that fails (a full disk, a quota) never raises in the middle of a step: the writer stops writing,
    keeps the reason in :attr:`error` (one line), and the trainer acts on it at the end of the step."""

    def __init__(self, run_dir: str | os.PathLike[str], *, enabled: bool) -> None:
        self._writer = None
        self.run_dir = Path(run_dir)
        self.error: str | None = None
        self._pending: list[tuple[int, str, float | torch.Tensor]] = []  # (step, tag, value) to write at sync()
        self._pending_tags: set[str] = set()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _silence_event_writer_threads()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(run_dir))

    def _failed(self, err: OSError) -> None:
        self.error = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        writer, self._writer = self._writer, None
        with contextlib.suppress(Exception):  # its thread has died; closing flushes into the same full disk
            writer.close()

    def scalars(self, step: int, values: dict[str, float | torch.Tensor]) -> None:
        """Write ``values`` at ``step``: floats now, 0-d tensors at the next :meth:`sync` (pass tensors that are not
        changed in place afterwards)."""
        if self._writer is None:
            return
        try:
            for tag, value in values.items():
                if isinstance(value, torch.Tensor) or tag in self._pending_tags:
                    self._pending.append((step, tag, value.detach() if isinstance(value, torch.Tensor) else value))
                    self._pending_tags.add(tag)
                else:
                    self._writer.add_scalar(tag, value, global_step=step)
        except OSError as err:
            self._failed(err)

    def sync(self) -> None:
        """Read the kept tensors on the host (one synchronisation per device) and write everything kept, in order."""
        pending, self._pending, self._pending_tags = self._pending, [], set()
        if self._writer is None or not pending:
            return
        tensors: dict[torch.device, list[int]] = {}
        for i, (_, _, value) in enumerate(pending):
            if isinstance(value, torch.Tensor):
                tensors.setdefault(value.device, []).append(i)
        values: list[float | torch.Tensor] = [value for _, _, value in pending]
        for where in tensors.values():
            read = torch.stack([values[i].to(torch.float64).reshape(()) for i in where]).tolist()
            for i, value in zip(where, read):
                values[i] = value
        try:
            for (step, tag, _), value in zip(pending, values):
                self._writer.add_scalar(tag, value, global_step=step)
        except OSError as err:
            self._failed(err)

    def flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as err:
                self._failed(err)

    def close(self) -> None:
        self.sync()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as err:
                self.error = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")


def _silence_event_writer_threads() -> None:
    """TensorBoard writes events in a thread that, when a write fails, prints its traceback (threading's
    excepthook) and hands the error to the next call of the writer, where :class:`MetricsWriter` turns it into one
    line. Keep the first from reaching stderr (installed once per process; every other thread's exceptions are
    printed as before)."""
    previous = threading.excepthook
    if getattr(previous, "megatron_pept", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.megatron_pept = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def console_line(
    *,
    step: int,
    total_steps: int,
    loss: float,
    lr: float,
    grad_norm: float,
    tokens_per_sec: float,
    mfu: float,
    mem_gb: float,
    eta_seconds: float,
) -> str:
    width = len(str(total_steps))
    return (
        f"step {step:>{width}}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
        f"{tokens_per_sec:,.0f} tok/s | mfu {100 * mfu:.1f}% | mem {mem_gb:.2f} GB | eta {format_duration(eta_seconds)}"
    )


def log_step(
    writer: MetricsWriter,
    *,
    step: int,
    total_steps: int,
    loss: float,
    lr: float,
    grad_norm: float,
    rates: StepRates,
    mem_gb: float,
    console: bool,
    memory: dict[str, float] | None = None,
) -> None:
    """The scalars of one finished step (``step``: steps done) and, when ``console``, its console line (with the
    rates averaged since the first step); ``memory``: more ``mem/`` scalars (:func:`device_memory_gb`)."""
    writer.scalars(
        step,
        {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "perf/tokens_per_sec": rates.tokens_per_sec,
            "perf/mfu": rates.mfu,
            "mem/peak_gb": mem_gb,
            **(memory or {}),
        },
    )
    if console:
        logger.info(
            console_line(
                step=step,
                total_steps=total_steps,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_sec=rates.mean_tokens_per_sec,
                mfu=rates.mean_mfu,
                mem_gb=mem_gb,
                eta_seconds=rates.eta_seconds,
            )
        )
