"""The SLURM launcher for real: launch/slurm.sbatch submitted with sbatch trains two DDP ranks on gloo.

Needs a SLURM controller with an idle node; tools/slurm_local.sh starts a one-node cluster on this machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skips unless a controller answers with an idle or mixed node (sinfo gives up on a dead one in ~9 s)."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
        states = proc.stdout.split() if proc.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        states = []
    if shutil.which("sbatch") is None or not any(s.startswith(("idle", "mixed")) for s in states):
        pytest.skip("no SLURM controller answering; start one with tools/slurm_local.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_launcher_trains_ddp(slurm: None, quickstart_data: Path, tmp_path: Path) -> None:
    """`slurm` comes first so that a skip does not build the quickstart data for nothing."""
    out = tmp_path / "slurm.out"
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port())}
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--nodes",
            "1",
            "--time",
            "10",
            "--output",
            str(out),
            "launch/slurm.sbatch",
            "--config",
            "configs/quickstart.yaml",
            f"run_dir={tmp_path / 'run'}",
            f"data.path={quickstart_data}",
            "train.steps=3",
            "train.eval_interval=0",
            "metrics.tensorboard=false",
            "parallel.backend=ddp",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log}"
    assert "1 node(s) x 2 process(es)" in log, log
    assert "step 3/3" in log, log
