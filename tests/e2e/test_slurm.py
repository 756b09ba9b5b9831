"""The SLURM launcher for real: launch/slurm.sbatch submitted with sbatch trains two DDP ranks on gloo; on the
time-limit warning (SIGUSR1 to the batch script) the job saves, requeues itself and resumes bit-identical.

Needs a SLURM controller with an idle node; tools/slurm_local.sh starts a one-node cluster on this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_pept.checkpoint import newest_complete
from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE

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


STEPS = 6


def job_args(data: Path, run_dir: Path) -> list[str]:
    return [
        "--config",
        "configs/quickstart.yaml",
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.seq_len=32",
        f"train.steps={STEPS}",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "train.log_interval=1",
        "metrics.tensorboard=false",
        "data.verify_checksums=false",
        "checkpoint.interval=100",  # saved on the stop signal and at the end only
        "parallel.backend=ddp",
    ]


def job_state(job: str) -> tuple[str, int]:
    """(JobState, Restarts) from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    state, restarts = re.search(r"JobState=(\S+)", out), re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else 0


def wait_for(what: str, check, *, job: str, log: Path, timeout: float = 420):
    """Poll (observed state, never a guessed delay) until ``check()`` returns something true; fail after
    ``timeout`` with the job's state and log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    text = log.read_text() if log.exists() else ""
    pytest.fail(f"timed out waiting for {what}: job {job} {job_state(job)}\n{text[-3000:]}")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGKILL)


def signal_pending(pid: int, sig: signal.Signals) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        pytest.fail(f"worker {pid} is gone before {sig.name} reached it (the job was killed instead)")
    pending = 0
    for field in ("SigPnd", "ShdPnd"):
        pending |= int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(pending & (1 << (sig - 1)))


def test_time_limit_warning_saves_requeues_and_resumes_bit_identical(
    slurm: None, quickstart_data: Path, tmp_path: Path
) -> None:
    """The job's rank 0 freezes after step 3 (megatron_pept.faults); once its log says so, the test sends the
    warning the job would get before its time limit, SIGUSR1 to the batch script only (`scancel --batch`, as
    `--signal=B:USR1@120` does), waits until the signal has reached the frozen worker (through srun and torchrun)
    and lets it go on. The job saves step 3 (or 4), requeues itself, starts again (once SLURM's hold after a requeue
    is over: AuthInfo cred_expire, 120 s by default, 30 s with tools/slurm_local.sh), resumes from that step and
    finishes: its final weights equal an uninterrupted run's (torchrun on this machine, same 2 ranks) bit for
    bit."""
    out = tmp_path / "slurm.out"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RDZV_PORT"},  # the one-node default: a free port
        "PYTHON": sys.executable,
        "NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "1", "--time", "10", "--output", str(out), "launch/slurm.sbatch"]
        + job_args(quickstart_data, tmp_path / "run"),
        cwd=REPO,
        env={**env, ENV_VAR: "step.end@3"},  # the requeued start resumes at step 4: it never meets the fault
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    worker = None
    try:

        def frozen() -> int | None:
            text = out.read_text() if out.exists() else ""
            found = re.search(rf"{re.escape(FAULT_FROZEN_LINE)} \S+ \(pid (\d+)\)", text)
            if found is None and job_state(job)[0] not in ("PENDING", "CONFIGURING", "RUNNING"):
                pytest.fail(f"setup: job {job} ended {job_state(job)} before its fault point:\n{text[-3000:]}")
            return int(found.group(1)) if found else None

        worker = wait_for("rank 0 frozen after step 3", frozen, job=job, log=out)
        sent = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        wait_for("SIGUSR1 at the frozen worker", lambda: signal_pending(worker, signal.SIGUSR1), job=job, log=out)
        os.kill(worker, signal.SIGCONT)
        wait_for("the requeue", lambda: job_state(job)[1] >= 1, job=job, log=out)
        final = wait_for(  # a requeued job waits out the old start's credential (cred_expire, 30 s in slurm_local.sh)
            "the requeued start to end",
            lambda: (
                (s := job_state(job))[0] not in ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING") and s
            ),
            job=job,
            log=out,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)  # never left stopped, if the test failed before
    log = out.read_text()
    assert final == ("COMPLETED", 1), f"{final}\n{log[-4000:]}"
    checkpoints = tmp_path / "run" / "checkpoints"
    # step 3, or 4 if the signal's handler ran after step 3's stop check (test_launchers.py::stop_step)
    found = re.search(r"megatron_pept: stopped at step (\d+) on SIGUSR1: checkpoint step_(\d+) saved", log)
    assert found and found[1] == str(int(found[2])) and found[1] in ("3", "4"), log[-4000:]
    assert f"requeueing job {job}" in log, log[-4000:]
    assert f"job {job} (start 2)" in log, log[-4000:]
    assert f"resumed from {checkpoints / f'step_{int(found[1]):08d}'}" in log, log[-4000:]
    assert f"step {STEPS}/{STEPS}" in log.split("(start 2)")[1], log[-4000:]

    reference = tmp_path / "reference"
    proc = subprocess.Popen(
        [str(REPO / "launch/torchrun.sh"), *job_args(quickstart_data, reference)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:  # timed out: the launcher and its workers
            kill_tree(proc.pid)
    assert proc.returncode == 0, output[-3000:]
    weights = {}
    for run in (checkpoints, reference / "checkpoints"):
        found = newest_complete(run)
        assert found is not None and found.step == STEPS, run
        weights[run] = load_full_tensors(found.path, prefix="model.")
    resumed, whole = weights.values()
    assert resumed.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
