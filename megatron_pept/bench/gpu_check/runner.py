"""The whole GPU check: :func:`run_gpu_check` runs every row group of the settings in order (memory first, while
nothing else holds device memory), with the trainer's log lines on stderr, and judges the rows."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_pept.bench.gpu_check.attention import attention_rows
from megatron_pept.bench.gpu_check.galore_8bit import galore_8bit_row
from megatron_pept.bench.gpu_check.harness import _data_path
from megatron_pept.bench.gpu_check.memory import memory_row
from megatron_pept.bench.gpu_check.report import NO_CUDA_LINE, GpuCheckResult
from megatron_pept.bench.gpu_check.settings import CHECK_GROUPS, GpuCheckSettings
from megatron_pept.bench.gpu_check.throughput import throughput_rows
from megatron_pept.bench.gpu_check.verdicts import Row, resolve_status
from megatron_pept.errors import UserError


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


def require_cuda() -> None:
    """Raise :class:`UserError` (``NO_CUDA_LINE``, with torch's reason when it gave one) unless a CUDA device is
    usable. A CUDA build without a working driver warns while answering ``is_available()``: the warning's first line
    becomes the reason, so the tool still prints one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    raise UserError(NO_CUDA_LINE + (f" ({reasons[0][:200]})" if reasons else ""))


def run_gpu_check(s: GpuCheckSettings, *, log: Callable[[str], None] | None = None) -> GpuCheckResult:
    """Run every row group of ``s`` in order and judge the rows (see the package docstring). A check on a CUDA device
    (the real one) raises :class:`UserError` before anything runs when there is none."""
    s.validate()
    start = time.perf_counter()
    device = torch.device(s.device)
    if device.type == "cuda":
        require_cuda()

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
