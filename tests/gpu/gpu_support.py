"""What the GPU suite's modules share: where they run, the size of their runs, the run config, and the checks of a
loss curve.

The suite runs where CUDA is present (``pytest tests/gpu``); without CUDA every module is skipped at collection.
``MEGATRON_PEPT_GPU_TESTS_ON_CPU=1`` runs the same test bodies on the CPU instead (the ``debug`` model, shorter
sequences), to find the bugs of a body that do not depend on the GPU on a machine without one; the checks that only
a GPU can make skip there (flash-attn, transformer-engine) or hold trivially (bitsandbytes' kernels are its CPU
ones, NCCL is gloo, every tensor is on the CPU). CI never sets it; it is a tool for whoever edits this suite.

    from gpu_support import DEVICE, ON_CPU, SIZE, requires_gpu, run_overrides, ...

(``tests/gpu`` is put on ``sys.path`` by pytest for its modules, as ``tests/`` is for ``launch``.)
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

ON_CPU = os.environ.get("MEGATRON_PEPT_GPU_TESTS_ON_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

requires_gpu = pytest.mark.skipif(
    not (HAS_CUDA or ON_CPU),
    reason="needs a CUDA device (MEGATRON_PEPT_GPU_TESTS_ON_CPU=1 runs the bodies on the CPU, for editing the suite)",
)
"""Every module's ``pytestmark`` (with ``pytest.mark.gpu``): the whole module is skipped without CUDA."""


@dataclass(frozen=True)
class RunSize:
    model: str
    rank: int
    seq_len: int
    batch: int


SIZE = RunSize("60m", 64, 256, 8) if HAS_CUDA else RunSize("debug", 8, 32, 8)
"""The runs' shape: on a GPU the ``60m`` model (8 layers of width 512; rank 64 makes GaLore's projected moments
64 x 512, past the 4096 elements below which the 8-bit optimizer keeps fp32 moments), 8 x 256 tokens a step; on the
CPU the ``debug`` model and 8 x 32 tokens, to keep the bodies quick."""


def import_or_skip(module: str) -> ModuleType:
    """``module``, or a skip naming why it does not import. Unlike ``pytest.importorskip``, any error skips:
    transformer-engine raises RuntimeError, flash-attn an ImportError of its compiled part, on a machine they were
    not built for. The module is the one the stack imports (``transformer_engine.pytorch``, not the top-level
    package)."""
    try:
        return importlib.import_module(module)
    except Exception as err:
        lines = str(err).strip().splitlines()
        pytest.skip(f"{module} does not import here ({type(err).__name__}: {lines[0] if lines else ''})")


def run_overrides(data: Path, run_dir: Path, *extra: str, steps: int = 10) -> list[str]:
    """A short bf16 run of ``SIZE`` on ``DEVICE``: a log line every step, validation only after the last step, no
    TensorBoard, no checkpoints unless ``extra`` asks (later overrides win)."""
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.verify_checksums=false",
        f"model.name={SIZE.model}",
        f"data.seq_len={SIZE.seq_len}",
        f"train.steps={steps}",
        f"train.global_batch_size={SIZE.batch}",
        f"train.micro_batch_size={SIZE.batch}",
        "train.dtype=bf16",
        f"train.device={DEVICE.type}",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "train.eval_batches=1",
        "train.log_interval=1",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        f"method.rank={SIZE.rank}",
        "metrics.tensorboard=false",
        # On a GPU the trainer looks the device's peak up (or measures it); on the CPU a fixed peak saves a matmul
        # benchmark per run.
        *(() if HAS_CUDA else ("metrics.peak_tflops=1",)),
        *extra,
    ]


def make_trainer(data: Path, run_dir: Path, *extra: str, steps: int = 10):
    """The trainer the CLI builds for :func:`run_overrides` (``python -m megatron_pept.train`` calls the same)."""
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    return Trainer(load_config(None, run_overrides(data, run_dir, *extra, steps=steps)))


def train(data: Path, run_dir: Path, *extra: str, steps: int = 10) -> list[float]:
    """Train a run to its end in this process; its per-step training losses."""
    with make_trainer(data, run_dir, *extra, steps=steps) as trainer:
        return trainer.train().train_losses


def assert_loss_falls(losses: list[float], *, what: str = "") -> None:
    """Every loss finite, and the mean of the last three below the mean of the first three (ten steps on the
    quickstart data at lr 3e-3 take the loss down by far more than step-to-step noise)."""
    assert losses and all(math.isfinite(v) for v in losses), f"{what}: non-finite loss in {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{what}: the loss did not fall over {len(losses)} steps: {losses}"


def max_gap(a: list[float], b: list[float]) -> float:
    """The largest per-step absolute difference of two loss curves of the same length."""
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[list[str]]:
    """Deterministic kernels where torch has them (``torch.use_deterministic_algorithms(True, warn_only=True)``, and
    the cuBLAS workspace setting it asks for), so two runs of the same steps on a GPU can be compared bit for bit;
    yields the warnings of the ops that have no deterministic version (for the message of a failed comparison).
    Restores the previous setting."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    old_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
        notes.extend(sorted({str(w.message).splitlines()[0] for w in caught if "determinis" in str(w.message)}))
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if old_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = old_env
