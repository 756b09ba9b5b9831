"""The launchers for real: two torchrun "nodes" on one machine (c10d rendezvous on 127.0.0.1) train and match one
process; a stop signal sent to a launcher (SIGTERM, SIGUSR1) saves and exits 0, and resuming ends bit-identical;
two one-node jobs run on one host at once; every launch script parses (the SLURM one runs for real in
tests/e2e/test_slurm.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_pept.checkpoint import list_checkpoints, newest_complete
from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.config import load_config
from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE
from megatron_pept.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.seq_len=32",
        "train.steps=3",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "train.log_interval=1",
        "metrics.tensorboard=false",
        "data.verify_checksums=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
    ]


def test_two_node_torchrun_matches_one_process(quickstart_data: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "RDZV_ID": "test",
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,  # the test's interpreter, not whichever `python` is first on PATH
    }
    args = [str(REPO / "launch/torchrun.sh"), *overrides(quickstart_data, tmp_path / "run"), "parallel.backend=ddp"]
    nodes = [
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    # DeepSpeed's shared-memory all-reduce (a JIT-compiled C++ op, with /dev/shm buffers) is not built on CPU
    assert not (tmp_path / "torch_extensions").exists()
    logged = [float(x) for o in outputs for x in re.findall(r"step +\d+/3 \| loss ([0-9.]+)", o)]
    assert len(logged) == 3  # rank 0 logs, on whichever node it landed
    reference = Trainer(load_config(None, overrides(quickstart_data, tmp_path / "single"))).train().train_losses
    assert logged == pytest.approx(reference, abs=2e-4)  # the console prints 4 decimals


def test_two_node_deepspeed_no_ssh_matches_one_process(quickstart_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "nodes" on this machine
    port = str(free_port())
    args = [
        str(REPO / "launch/deepspeed.sh"),
        *overrides(quickstart_data, tmp_path / "run"),
        "parallel.backend=deepspeed",
        "parallel.zero_stage=2",
    ]
    nodes = []
    for node_rank in (0, 1):
        env = {
            **os.environ,
            "HOSTFILE": str(hostfile),
            "NO_SSH": "1",
            "NODE_RANK": str(node_rank),
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable,
            "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        }
        nodes.append(
            subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    # DeepSpeed's shared-memory all-reduce (a JIT-compiled C++ op, with /dev/shm buffers) is not built on CPU
    assert not (tmp_path / "torch_extensions").exists()
    logged = [float(x) for o in outputs for x in re.findall(r"step +\d+/3 \| loss ([0-9.]+)", o)]
    assert len(logged) == 3
    reference = Trainer(load_config(None, overrides(quickstart_data, tmp_path / "single"))).train().train_losses
    assert logged == pytest.approx(reference, abs=2e-4)


# -- stop signals sent to the launcher, and one-node jobs side by side ---------------------------------------------

STOP_STEPS = 6
# The environment of a one-node job left to its defaults (no endpoint, id or port from the caller's environment).
ONE_NODE_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT", "RDZV_ID", "MASTER_PORT")},
    "NPROC_PER_NODE": "2",
    "NUM_GPUS": "2",
    "PYTHON": sys.executable,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",  # log lines arrive as they happen
}


def stop_command(script: str, data: Path, run_dir: Path) -> list[str]:
    """A 2-rank job of STOP_STEPS steps that saves only on a stop signal and at the end: the same command starts,
    resumes and (without a signal) runs the reference."""
    backend = ["parallel.backend=deepspeed", "parallel.zero_stage=2"] if script == "deepspeed.sh" else []
    return [
        str(REPO / "launch" / script),
        *overrides(data, run_dir),
        f"train.steps={STOP_STEPS}",
        "checkpoint.interval=100",
        "parallel.backend=ddp",
        *backend,
    ]


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and every process below it (torchrun starts each worker in a session of its own), each with its
    start time (so that a pid reused later by another process is never killed for it)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
            started[int(stat.parent.name)] = fields[19]
    found, todo = {pid: started.get(pid, "")}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = started.get(child, "")
            todo.append(child)
    return found


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def exited(pid: int) -> bool:
    """Gone, or a zombie: it has exited and waits for a parent to reap it (an orphan's new parent, PID 1 of a
    container or VM, may never do so)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class Job:
    """A launcher started in a session of its own, with its output read line by line. ``seen`` remembers every
    process ever found below it, so that cleanup kills the workers even once the launcher has gone."""

    def __init__(self, cmd: list[str], env: dict[str, str], tmp: Path) -> None:
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.seen: dict[int, str] = {}  # pid -> start time

    def frozen_worker(self) -> int:
        """Read until a worker says it froze at its fault point (megatron_pept.faults); return that worker's pid."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if FAULT_FROZEN_LINE in line:
                self.seen.update(process_tree(self.proc.pid))
                return int(re.search(r"\(pid (\d+)\)", line).group(1))
        pytest.fail(f"setup: the job ended (exit {self.proc.wait()}) before its fault point:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = 600) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.seen.update(process_tree(self.proc.pid))
        for pid, started in self.seen.items():
            if start_time(pid) == started:  # still that process
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=30)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator:
    started: list[Job] = []

    def start(cmd: list[str], env: dict[str, str] = ONE_NODE_ENV) -> Job:
        started.append(Job(cmd, env, tmp_path))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def stop_step(log: str, sig: signal.Signals) -> int:
    """The step a run that was frozen after step 3 stopped at on ``sig``: 3, or 4. A signal sent to a stopped
    process is taken, once it continues, by whichever of its threads runs first; CPython then runs the handler in
    the main thread at its next check, which can come after the main thread has passed step 3's stop check (then
    every rank stops at step 4 together). Either way the step it names is the one saved."""
    found = re.search(rf"megatron_pept: stopped at step (\d+) on {sig.name}: checkpoint step_(\d+) saved", log)
    assert found and found[1] == str(int(found[2])) and int(found[1]) in (3, 4), log[-3000:]
    return int(found[1])


def wait_until_pending(pid: int, sig: signal.Signals, launcher: subprocess.Popen | None, timeout: float = 120) -> None:
    """Return once ``sig`` is pending on the stopped process ``pid`` (it has reached it: it is handled as soon as the
    process continues). Fails if the launcher (when given) exits first or the signal never arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            pytest.fail(f"worker {pid} is gone before {sig.name} reached it (launcher exit {launcher.poll()})")
        pending = 0
        for field in ("SigPnd", "ShdPnd"):
            pending |= int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
        if pending & (1 << (sig - 1)):
            return
        if launcher is not None and launcher.poll() is not None:
            pytest.fail(f"the launcher exited ({launcher.returncode}) on {sig.name} before the worker got it")
        time.sleep(0.02)
    pytest.fail(f"{sig.name} did not reach worker {pid} within {timeout} s")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = newest_complete(run_dir / "checkpoints")
    assert found is not None and found.step == STOP_STEPS, found
    return load_full_tensors(found.path, prefix="model.")


@pytest.mark.parametrize(
    "script, sig",
    # each signal and each launcher once (the launchers share one signal wrapper): SLURM's warning signal to
    # torchrun, `kill`'s and scancel's SIGTERM to DeepSpeed's launcher
    [("torchrun.sh", signal.SIGUSR1), ("deepspeed.sh", signal.SIGTERM)],
    ids=["torchrun-SIGUSR1", "deepspeed-SIGTERM"],
)
def test_stop_signal_to_the_launcher_saves_exits_0_and_resumes(
    script: str, sig: signal.Signals, jobs, quickstart_data: Path, tmp_path: Path
) -> None:
    """Job A's rank 0 is frozen after step 3 (before its stop-signal check), holding its rendezvous store and port.

    Side by side: job B, the same command in another run_dir with the same defaults, runs from start to end on
    the same host meanwhile and exits 0 with a complete final checkpoint (with a shared default port and
    rendezvous id, B joined A's rendezvous under torchrun, or failed to bind under DeepSpeed).

    Then the stop signal goes to A's launcher process only (as `kill PID` or SLURM's batch-step warning would); the
    test waits until it has reached the frozen worker and lets it go on. Both ranks save step 3 (or 4: stop_step)
    and exit 0, and so does the launcher; the same command then resumes and ends with B's weights (B is the
    uninterrupted run), bit for bit (torchrun; the DeepSpeed job resumes from that step and finishes)."""
    if script == "deepspeed.sh":
        pytest.importorskip("deepspeed")
    cmd = stop_command(script, quickstart_data, tmp_path / "run")
    job = jobs(cmd, {**ONE_NODE_ENV, ENV_VAR: "step.end@3"})
    worker = job.frozen_worker()

    side = jobs(stop_command(script, quickstart_data, tmp_path / "side"))
    assert side.finish(timeout=300) == 0, side.output()[-3000:]
    if script == "torchrun.sh":
        uninterrupted = final_weights(tmp_path / "side")
    else:  # DeepSpeed's own files hold the weights; the run must end with a complete checkpoint all the same
        found = newest_complete(tmp_path / "side" / "checkpoints")
        assert found is not None and found.step == STOP_STEPS, found

    job.proc.send_signal(sig)
    wait_until_pending(worker, sig, job.proc)
    os.kill(worker, signal.SIGCONT)
    assert job.finish() == 0, job.output()[-3000:]
    log = job.output()
    assert f"{sig.name} sent to worker(s)" in log, log[-3000:]
    step = stop_step(log, sig)
    assert [f.step for f in list_checkpoints(tmp_path / "run" / "checkpoints")] == [step]

    resumed = jobs(cmd)
    assert resumed.finish() == 0, resumed.output()[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{step:08d}'}" in resumed.output()
    assert f"step {STOP_STEPS}/{STOP_STEPS}" in resumed.output()
    if script == "torchrun.sh":
        weights = final_weights(tmp_path / "run")
        assert weights.keys() == uninterrupted.keys()
        for name, value in uninterrupted.items():
            assert torch.equal(weights[name], value), name


def test_a_killed_launcher_leaves_no_orphans_its_workers_save_and_stop(
    jobs, quickstart_data: Path, tmp_path: Path
) -> None:
    """kill -9 of the torchrun agent (the workers' parent) while rank 0 is frozen after step 3: the kernel sends
    each worker SIGTERM (megatron_pept.signals.follow_the_launcher), both save step 3 (or 4: stop_step) and exit,
    and no process of the job is left. Before, they trained on to the end as orphans, holding the devices and the
    run_dir lock."""
    run_dir = tmp_path / "run"
    job = jobs(stop_command("torchrun.sh", quickstart_data, run_dir), {**ONE_NODE_ENV, ENV_VAR: "step.end@3"})
    worker = job.frozen_worker()
    agent = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert agent == job.proc.pid  # torchrun.sh execs the wrapper, which runs the agent in its own process
    os.kill(agent, signal.SIGKILL)
    wait_until_pending(worker, signal.SIGTERM, None)  # from the kernel: nobody else sends it
    os.kill(worker, signal.SIGCONT)
    job.finish()  # the output ends once every worker has closed it
    log = job.output()
    assert job.proc.returncode == -signal.SIGKILL, log[-3000:]
    assert [f.step for f in list_checkpoints(run_dir / "checkpoints")] == [stop_step(log, signal.SIGTERM)]
    # the output's end is each worker closing it, which can come a moment before the process is gone: wait for
    # the observed state, with a bound that only turns a process that never exits into a failure
    deadline = time.monotonic() + 60
    while True:
        left = [pid for pid, started in job.seen.items() if start_time(pid) == started and not exited(pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes of the job still running: {left}"


def test_a_stop_signal_before_the_training_loop_is_kept_for_it() -> None:
    """The entry point catches the stop signals from the moment its configuration is read
    (megatron_pept.signals.caught_early): one received while the model is built or a checkpoint loaded is not
    lost, the loop's StopSignals starts with it (and stops at the end of the first step); outside, none is kept."""
    from megatron_pept.signals import StopSignals, caught_early, received_signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with caught_early():
        signal.raise_signal(signal.SIGUSR1)
        with StopSignals(enabled=True) as stop:
            assert stop.received
    assert received_signal() == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored
    with StopSignals(enabled=True) as stop:  # no early catcher: a signal from an earlier run does not count
        assert not stop.received
    with caught_early(enabled=False):  # checkpoint.save_on_signal=false: nothing installed
        assert {sig: signal.getsignal(sig) for sig in before} == before


def test_signal_wrapper_refuses_bad_input() -> None:
    """`python -m megatron_pept.signals` with no launcher, an unknown one, or torchrun's own signal list: one line."""
    for args in ([], ["mpirun"], ["torchrun", "--signals-to-handle=SIGTERM", "x.py"]):
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_pept.signals", *args], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("megatron_pept.signals: error:"), proc.stderr


def test_torchrun_script_refuses_a_bad_node_count() -> None:
    env = {**ONE_NODE_ENV, "NNODES": "two"}
    proc = subprocess.run([str(REPO / "launch/torchrun.sh")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "torchrun.sh: error: NNODES must be a node count such as 2 (or MIN:MAX), got 'two'\n"


@pytest.mark.parametrize("script", [*sorted(p.name for p in (REPO / "launch").glob("*.sh")), "slurm.sbatch"])
def test_launch_scripts_parse(script: str) -> None:
    """Every launcher is valid bash (``bash -n``: parsed, not run). What the SLURM script runs is tested for real
    with sbatch in tests/e2e/test_slurm.py (skipped without a SLURM controller), torchrun.sh and deepspeed.sh above."""
    proc = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_comm_benchmark_counts_the_collectives_of_each_backend(quickstart_data: Path) -> None:
    """tools/bench.py --suite comm on the debug model: ZeRO-2 all-gathers the updated parameters once per step
        (half of the fp32 parameter bytes sent per rank with 2 ranks), FSDP2 reduce-scatters each gradient once and
    gathers the blocks' parameters for forward and again for backward,
        and GaLore adds its low-rank all-reduces on top of full's traffic, more on the refresh step."""
    from megatron_pept.bench.comm import CommBenchSettings, run_comm_benchmark

    methods = ("full", "galore", "muon")
    result = run_comm_benchmark(
        CommBenchSettings(model="debug", rank=8, steps=2, data=str(quickstart_data), methods=methods)
    )
    runs = result["runs"]
    param_mb = runs["deepspeed/full"]["param_mb"]  # fp32 parameters
    ds_gather = runs["deepspeed/full"]["step_wire_by_kind_mb"]["all_gather"]
    assert ds_gather == pytest.approx(param_mb / 2, rel=0.02)
    fsdp = runs["fsdp2/full"]["step_wire_by_kind_mb"]
    assert fsdp["reduce_scatter"] == pytest.approx(param_mb / 2, rel=0.02)  # each gradient once
    assert param_mb / 2 < fsdp["all_gather"] < param_mb  # blocks gathered for forward and again for backward
    for backend in ("fsdp2", "deepspeed"):
        galore = runs[f"{backend}/galore"]
        assert 1.0 < galore["step_wire_ratio_vs_full"] < galore["refresh_step_wire_ratio_vs_full"]
        # Muon's owner scheme: each hidden matrix gathered to one rank and scattered back, both in bf16, about
        # (w - 1) / w of the matrices' bytes each way over the ranks (padding aside), nothing else on top of full's
        # (FSDP2: every matrix is cut by rows, evenly here); under ZeRO-2 only the matrices a partition boundary
        # cuts move, the others are done where they are; nothing else is added to full's traffic
        muon, full = runs[f"{backend}/muon"]["step_wire_by_kind_mb"], runs[f"{backend}/full"]["step_wire_by_kind_mb"]
        matrices_mb = 4 * 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 176 * 64) / 1e6  # the 14 projections, fp32
        if backend == "fsdp2":
            assert muon["gather"] == pytest.approx(matrices_mb / 4, rel=1e-6)  # bf16: half of (w - 1) / w
            assert muon["scatter"] == pytest.approx(matrices_mb / 4, rel=1e-6)
        else:
            assert muon.get("gather", 0.0) < matrices_mb / 8 and muon.get("scatter", 0.0) < matrices_mb / 8
        others = {k: v for k, v in muon.items() if k not in ("gather", "scatter")}
        assert others == pytest.approx(full, rel=0.01, abs=1e-4)  # + the statistics: 8 bytes


def test_per_layer_updates_bound_live_gradients_by_one_parameter(quickstart_data: Path) -> None:
    """tools/bench.py --suite grad_memory on the debug model: with a global step every gradient is alive at the
    end of backward; with per-layer updates under DDP and FSDP2 at most the largest (local) parameter's."""
    from megatron_pept.bench.comm import GradMemorySettings, run_grad_memory_benchmark

    runs = run_grad_memory_benchmark(GradMemorySettings(model="debug", rank=8, data=str(quickstart_data)))["runs"]
    for backend in ("ddp", "fsdp2"):
        for method in ("full", "galore"):
            whole, per_layer = runs[f"{backend}/{method}/global"], runs[f"{backend}/{method}/per_layer"]
            assert whole["peak_grad_mb"] == pytest.approx(whole["all_grads_mb"])
            assert per_layer["peak_grad_mb"] == pytest.approx(per_layer["largest_param_mb"], rel=0.01)
            assert per_layer["peak_grad_mb"] < 0.5 * whole["peak_grad_mb"]
