"""``train.profile_steps=A:B``: torch.profiler over training steps A to B (counted from 1, as the console counts
them), on rank 0 only, written when step B ends as a trace in TensorBoard's profiler format (a Chrome trace JSON
file, ``RANK.TIME.pt.trace.json``) under ``run_dir/profile/``: open it with ``tensorboard --logdir RUN_DIR`` and
the torch-tb-profiler plugin, or in Perfetto (ui.perfetto.dev) or chrome://tracing.

Each step is one ``ProfilerStep#N`` span (N: the step's number); CPU activity always, CUDA kernels on a GPU, with
tensor shapes and memory events. A run that ends or stops inside the range writes what it recorded. The recording
starts with step A, so that step also holds the profiler's own start-up (on a GPU, CUPTI's): begin a step before
the first one that matters; the profiled steps run slower, and step B's time includes writing the trace."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger("megatron_pept")

PROFILE_FOLDER = "profile"
"""The folder of the traces, under run_dir."""


class StepProfiler:
    """Profiles the steps ``first..last`` (``steps``; None: none) of rank 0's run into ``folder``. The trainer calls
    :meth:`step_starts` before each step and :meth:`step_ended` after it; use it as a context manager so that a
    run ending inside the range still writes its trace."""

    def __init__(self, steps: tuple[int, int] | None, *, folder: Path, device: torch.device, rank: int) -> None:
        self.steps = steps if rank == 0 else None  # one trace per run: the other ranks run the same steps
        self.folder, self.device, self.rank = Path(folder), torch.device(device), rank
        self._profiler: torch.profiler.profile | None = None
        self._span: torch.profiler.record_function | None = None
        self.finished = False

    def step_starts(self, step: int) -> None:
        """Step ``step`` (the ``step``-th optimizer step of the run) begins."""
        if self._profiler is not None:
            self._open_span(step)
            return
        if self.steps is None or self.finished:
            return
        first, last = self.steps
        if not first <= step <= last:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.folder), worker_name=f"rank{self.rank}"),
            record_shapes=True,
            profile_memory=True,
        )
        self._profiler.start()
        logger.info("profiling steps %d to %d into %s", step, last, self.folder)
        self._open_span(step)

    def _open_span(self, step: int) -> None:
        # The span TensorBoard's profiler plugin reads as one step, named by the run's step number (the profiler's
        # own step counter would start at 0 here, and its schedule at the run's first step, not at a resume's).
        self._span = torch.profiler.record_function(f"ProfilerStep#{step}")
        self._span.__enter__()

    def _close_span(self) -> None:
        span, self._span = self._span, None
        if span is not None:
            span.__exit__(None, None, None)

    def step_ended(self, step: int) -> None:
        """Step ``step`` ended."""
        if self._profiler is None:
            return
        self._close_span()
        if step >= self.steps[1]:
            self.stop()

    def stop(self) -> None:
        """End the recording (if one runs) and write its trace; a failed write is a warning, not the run's end."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        self._close_span()
        self.finished = True
        try:
            profiler.stop()
        except OSError as err:
            logger.warning("could not write the profiler trace into %s: %s", self.folder, err)

    @property
    def trace_files(self) -> list[Path]:
        """The traces written so far."""
        return sorted(self.folder.glob("*.pt.trace.json")) if self.folder.is_dir() else []

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
