"""The one way the tests start a training run as a user does: ``python -m megatron_pept.train`` (or the same module
under a launcher) in a subprocess run from the repository root, with the overrides of a small run kept here.

    from launch import ENV, REPO, run, run_all, small_run, train_command

(``tests/`` holds ``conftest.py``, so pytest puts it on ``sys.path``: every test folder imports this module.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")  # absolute: a run may start from another folder
TRAIN = (sys.executable, "-m", "megatron_pept.train")
# One intra-op thread per run (two torch processes on two cores slow each other 10-30x, DESIGN.md), and every log
# line as it is printed (the tests that act on a fault point read the run's output while it runs).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# A small run of the quickstart's debug model: windows of 32 tokens, a batch of 8 in micro-batches of 4, a log
# line every step; no evaluation, no TensorBoard and no checksum pass over the shards unless a test asks for them
# (overrides are applied in order, so a later one wins: small_run(..., "metrics.tensorboard=true")).
SMALL_RUN = (
    "data.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_interval=0",
    "train.eval_at_start=false",
    "train.log_interval=1",
    "metrics.tensorboard=false",
    "data.verify_checksums=false",
)


def small_run(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The overrides of a small run in ``run_dir`` on the data folder ``data``, then ``extra``."""
    return [f"run_dir={run_dir}", f"data.path={data}", *SMALL_RUN, *extra]


def train_command(*args: str, config: str | None = QUICKSTART, launcher: tuple[str, ...] | list[str] = TRAIN):
    """``python -m megatron_pept.train --config CONFIG ARGS...`` (``config=None``: no --config, the defaults);
    ``launcher`` replaces ``python -m megatron_pept.train`` (e.g. torchrun's command, ending in the module)."""
    return [*launcher, *(["--config", config] if config is not None else []), *args]


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 600, **kwargs):
    """``cmd`` to its end in ``cwd``, its output captured as text."""
    env = ENV if env is None else env
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def start(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, **kwargs) -> subprocess.Popen:
    """``cmd`` started in ``cwd`` (``ENV`` unless ``env``), its output in text mode (pipes as ``kwargs`` say)."""
    return subprocess.Popen(cmd, cwd=cwd, env=ENV if env is None else env, text=True, **kwargs)


def run_all(cmds: list[list[str]], *, jobs: int = 2, **kwargs) -> list[subprocess.CompletedProcess[str]]:
    """Each of ``cmds`` to its end as ``run`` does, ``jobs`` at a time, in order: independent runs of one thread
    each use both cores of a 2-core machine without slowing each other."""
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda cmd: run(cmd, **kwargs), cmds))
