"""Fault tolerance through the real entry point: kill -9 at seeded random points (step boundaries and every stage
of a save, synchronous or in the background) and resume, until the run ends with weights bit-identical to an
uninterrupted run; SIGTERM saves and exits cleanly; a damaged checkpoint is skipped; retention; refusals.

Faults are injected on observed progress, never after a sleep: the run freezes itself at the named point
(megatron_pept.faults) and the test acts once it has read that the run is there."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import ENV, TRAIN, run, run_all, small_run, start, train_command
from megatron_pept.checkpoint import list_checkpoints, newest_complete
from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE
from megatron_pept.signals import process_children

METHODS = {
    "full": [],
    "relora": ["method.reset_every=4", "method.rank=4"],
    "galore_dynamic_ef": ["method.rank=4", "method.dynamic_first=2", "method.dynamic_cap=3"],
    # an NF4 base: its quantised parts and exact master are saved and restored bit for bit
    "relora@nf4": ["method.reset_every=4", "method.rank=4", "method.base_dtype=nf4"],
    # seeds, refresh counts, moments and the limiter's norm; the random projection redrawn from them on resume
    "apollo_mini": ["method.update_proj_gap=3"],
    "fira": ["method.rank=4", "method.update_proj_gap=3"],  # + the saved SVD projector
    # bf16 weights, no fp32 copy: each weight's count of stochastically rounded updates (its random state)
    "full@bf16": ["train.param_dtype=bf16", "optim.weight_update=stochastic"],
    # the Muon family: momentum (bf16 Newton-Schulz), NorMuon's row moments, Dion's right factor, seed and momentum
    "muon": [],
    "normuon": [],
    "dion": ["method.rank=4"],
}
STEPS = 8


def command(data: Path, run_dir: Path, method: str, *extra: str, launcher: list[str] | None = None) -> list[str]:
    overrides = small_run(
        data,
        run_dir,
        f"train.steps={STEPS}",
        "metrics.peak_tflops=1",
        "checkpoint.interval=1",  # a save after every step: kills often land inside one
        f"method.name={method.split('@')[0]}",
        *METHODS[method],
        *extra,
    )
    return train_command(*overrides, launcher=launcher or TRAIN)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = newest_complete(run_dir / "checkpoints")
    assert found is not None and found.step == STEPS
    return load_full_tensors(found.path, prefix="model.")


# Where a kill may land in a synchronous run (a save after every step), and what the checkpoints folder must then
# hold: the newest complete checkpoint (relative to the step of the fault) and the step `latest` names.
SYNC_POINTS = {
    "step.end": (-1, -1),  # the update of step s is done, its save has not begun
    "save.written": (-1, -1),  # shards of step s on disk in .tmp-step_s, no marker
    "save.marked": (-1, -1),  # marker written in .tmp-step_s, not renamed
    "save.renamed": (0, -1),  # step_s complete, `latest` still names s - 1
    "save.committed": (0, 0),  # `latest` names step_s
}


def start_frozen(cmd: list[str], fault: str) -> tuple[subprocess.Popen, list[str]]:
    """Start ``cmd`` with the fault point ``fault`` (see megatron_pept.faults) and return once the run has printed
    that it froze there. A run that ends before reaching the point fails the test's setup: that is a bug, never
    the machine's speed."""
    proc = start(
        cmd,
        env={**ENV, ENV_VAR: fault},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a signal from the terminal running the tests does not reach it
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if FAULT_FROZEN_LINE in line:
            return proc, lines
    code = proc.wait()
    proc.stdout.close()
    pytest.fail(f"setup: the run ended (exit {code}) before reaching fault point {fault}:\n{''.join(lines[-30:])}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so killing torchrun's
    process group would leave the workers running)."""
    children = process_children()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_at(cmd: list[str], fault: str) -> None:
    """kill -9 the run and every process it started while it is frozen at ``fault``."""
    proc, _ = start_frozen(cmd, fault)
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def random_faults(rng: random.Random, points: list[str], *, ranks: int = 1) -> list[tuple[str, int, int]]:
    """A (point, step, rank) for each of ``points``, at steps drawn from successive stretches of the run (so each
    resumed run reaches the next one, and kills spread over restarts and refreshes)."""
    faults = []
    for k, point in enumerate(points):
        step = rng.randint(2 + k * (STEPS - 2) // len(points), 1 + (k + 1) * (STEPS - 2) // len(points))
        rank = rng.randrange(ranks) if point in ("step.end", "save.written") else 0  # only rank 0 commits
        faults.append((point, step, rank))
    return faults


def check_killed_state(root: Path, point: str, step: int, rank: int = 0) -> None:
    """The checkpoints folder shows the kill landed where it was injected (with rank ``rank`` frozen, rank 0 may
    have gone on to begin the save of ``step``, never to mark it)."""
    newest, latest = (step + d for d in SYNC_POINTS[point])
    found = newest_complete(root)
    assert found is not None and found.step == newest, f"{point}@{step}: newest complete {found}"
    assert (root / "latest").read_text().strip() == f"step_{latest:08d}", point
    tmps = list(root.glob(f".tmp-step_{step:08d}.*"))  # named after the run that wrote it
    if rank == 0:
        assert len(tmps) == (point in ("save.written", "save.marked")), point
    for tmp in tmps:
        assert (tmp / "COMPLETE.json").is_file() == (point == "save.marked"), point


@pytest.fixture(scope="module")
def references(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The uninterrupted runs, saving once at the end: the resumed runs, which save after every step, must end
    bit-identical to them (so a save leaves training as it was, too)."""
    tmp = tmp_path_factory.mktemp("reference")
    procs = run_all([command(quickstart_data, tmp / m, m, f"checkpoint.interval={STEPS}") for m in METHODS])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {method: final_weights(tmp / method) for method in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_kill_9_and_resume_ends_bit_identical(method: str, references, quickstart_data: Path, tmp_path: Path):
    """A kill at a seeded random point (a step boundary or any stage of a save), resumed, then the run finishes:
    its final weights equal the uninterrupted run's bit for bit. ``full`` is killed twice (a resumed run killed and
    resumed again); the methods' kills cover every point between them."""
    index = list(METHODS).index(method)
    points = [list(SYNC_POINTS)[(index + k) % len(SYNC_POINTS)] for k in range(2 if method == "full" else 1)]
    events = random_faults(random.Random(f"kill-{method}"), points)
    cmd = command(quickstart_data, tmp_path, method)
    for point, step, rank in events:
        kill_at(cmd, f"{point}@{step}@{rank}")
        check_killed_state(tmp_path / "checkpoints", point, step, rank)
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = final_weights(tmp_path)
    assert weights.keys() == references[method].keys()
    for name, value in references[method].items():
        assert torch.equal(weights[name], value), f"{name} differs after {events}"
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_two_fsdp2_ranks_killed_and_resumed_end_bit_identical(quickstart_data: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    launcher = [*torchrun, "-m", "megatron_pept.train"]
    method = "galore_dynamic_ef"
    extra = ["parallel.backend=fsdp2", "train.micro_batch_size=2"]
    reference = run(command(quickstart_data, tmp_path / "whole", method, *extra, launcher=launcher))
    assert reference.returncode == 0, reference.stderr[-3000:]
    cut = command(quickstart_data, tmp_path / "cut", method, *extra, launcher=launcher)
    rng = random.Random("kill-fsdp2")
    events = random_faults(rng, [rng.choice(list(SYNC_POINTS))], ranks=2)
    ((point, step, rank),) = events
    kill_at(cut, f"{point}@{step}@{rank}")
    check_killed_state(tmp_path / "cut" / "checkpoints", point, step, rank)
    proc = run(cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), f"{name} differs after {events}"


def test_sigterm_saves_and_exits_cleanly_then_resumes(references, quickstart_data: Path, tmp_path: Path) -> None:
    cmd = command(quickstart_data, tmp_path, "full", "checkpoint.interval=0")
    proc, lines = start_frozen(cmd, "step.end@3")  # frozen after step 3, before its stop-signal check
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # it has stopped (it is our child): signal it now
    assert os.WIFSTOPPED(status)
    proc.send_signal(signal.SIGTERM)  # pending while stopped, handled as soon as it continues
    os.kill(proc.pid, signal.SIGCONT)
    lines += proc.stdout.readlines()
    proc.stdout.close()
    assert proc.wait() == 0, "".join(lines[-30:])
    # step 3, or 4: the signal is taken by whichever thread runs first on SIGCONT, and CPython's handler may then
    # run in the main thread after step 3's stop check (tests/distributed/test_launchers.py::stop_step)
    stopped = [line for line in lines if "stop signal received at step" in line]
    assert len(stopped) == 1 and stopped[0].split("at step ")[1].split(":")[0] in ("3", "4"), "".join(lines[-30:])
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert [f.step for f in list_checkpoints(tmp_path / "checkpoints")] == [step], "".join(lines[-30:])
    resumed = run(command(quickstart_data, tmp_path, "full", "checkpoint.interval=100"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = final_weights(tmp_path)
    for name, value in references["full"].items():
        assert torch.equal(weights[name], value), name


def test_damaged_checkpoints_are_skipped_and_explicit_ones_refused(quickstart_data: Path, tmp_path: Path) -> None:
    proc = run(command(quickstart_data, tmp_path, "full", "train.steps=4", "checkpoint.keep_last=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "checkpoints"
    assert [f.step for f in list_checkpoints(root)] == [4, 3, 2, 1]
    assert (root / "latest").read_text().strip() == "step_00000004"
    shard = next((root / "step_00000004" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    data = next((root / "step_00000003" / "state").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    data.write_bytes(bytes(raw))
    (root / "step_00000002" / "COMPLETE.json").unlink()  # as if killed before the commit
    found = newest_complete(root)
    assert found is not None and found.step == 1
    explicit = run(command(quickstart_data, tmp_path, "full", f"checkpoint.resume={root / 'step_00000003'}"))
    assert explicit.returncode == 2
    assert explicit.stderr.strip().count("\n") == 0 and "sha256" in explicit.stderr
    fresh = run(command(quickstart_data, tmp_path, "full", "checkpoint.resume=none"))
    assert fresh.returncode == 2 and "already holds checkpoints" in fresh.stderr
    resumed = run(command(quickstart_data, tmp_path, "full", "train.steps=5", "checkpoint.keep_last=4"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and "step_00000001" in log


def test_retention_keeps_the_last_and_every_kth(quickstart_data: Path, tmp_path: Path) -> None:
    proc = run(
        command(quickstart_data, tmp_path, "full", "train.steps=7", "checkpoint.keep_last=2", "checkpoint.keep_every=3")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [f.step for f in list_checkpoints(tmp_path / "checkpoints")] == [7, 6, 3]


def test_kill_during_an_asynchronous_save_resumes_bit_identical(references, quickstart_data: Path, tmp_path: Path):
    """kill -9 while the background save of step 5 is in flight: the save of step 4 was committed when it began
    (the commit happens at the next save), step 5's folder stays temporary, and the resumed run ends identical."""
    cmd = command(quickstart_data, tmp_path, "full", "checkpoint.async_save=true")
    kill_at(cmd, "save.async@5")
    root = tmp_path / "checkpoints"
    assert newest_complete(root).step == 4 and len(list(root.glob(".tmp-step_00000005.*"))) == 1
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_00000004" in proc.stdout + proc.stderr  # resumed from there
    weights = final_weights(tmp_path)
    for name, value in references["full"].items():
        assert torch.equal(weights[name], value), name


def test_asynchronous_saves_commit_and_resume(references, quickstart_data: Path, tmp_path: Path) -> None:
    cmd = command(quickstart_data, tmp_path, "full", "checkpoint.async_save=true", "checkpoint.interval=3")
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [f.step for f in list_checkpoints(tmp_path / "checkpoints")] == [STEPS, 6, 3]
    weights = final_weights(tmp_path)
    for name, value in references["full"].items():
        assert torch.equal(weights[name], value), name


def test_inspect_and_convert_tools(quickstart_data: Path, tmp_path: Path) -> None:
    proc = run(command(quickstart_data, tmp_path / "run", "relora", "train.steps=3", "checkpoint.interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").write_text("{}")  # damage one
    shown = run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "run")])
    assert shown.returncode == 1, shown.stderr  # one of them is damaged: the check fails
    assert "step       3 of 3" in shown.stdout and "relora (phase: low rank)" in shown.stdout
    assert "complete   yes" in shown.stdout and "complete   NO:" in shown.stdout and "latest     yes" in shown.stdout
    good = run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "run" / "checkpoints" / "step_00000003")])
    assert good.returncode == 0 and "complete   yes" in good.stdout, good.stderr
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").write_text("garbage{")
    garbage = run(
        [sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "run" / "checkpoints" / "step_00000002")]
    )
    assert garbage.returncode == 1 and garbage.stderr == "" and "complete   NO:" in garbage.stdout, garbage.stderr
    out = tmp_path / "hf"
    converted = run(
        [sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"), "--output", str(out)]
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    again = run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"), "--output", str(out)])
    assert again.returncode == 2 and "not empty" in again.stderr and again.stderr.strip().count("\n") == 0
    missing = run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "nope"), "--output", "x"])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
