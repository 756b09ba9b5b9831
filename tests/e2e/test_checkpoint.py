"""Fault tolerance through the real entry point: kill -9 at random moments (during saves too) and resume, until
the run ends with weights bit-identical to an uninterrupted run; SIGTERM saves and exits cleanly; a damaged
checkpoint is skipped; retention; refusals."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_pept.checkpoint import list_checkpoints, newest_complete
from megatron_pept.checkpoint.export import load_full_tensors

REPO = Path(__file__).resolve().parents[2]
METHODS = {
    "full": [],
    "relora": ["method.reset_every=4", "method.rank=4"],
    "galore_dynamic_ef": ["method.rank=4", "method.dynamic_first=2", "method.dynamic_cap=3"],
}
STEPS = 12


def command(data: Path, run_dir: Path, method: str, *extra: str, launcher: list[str] | None = None) -> list[str]:
    return [
        *(launcher or [sys.executable, "-m", "megatron_pept.train"]),
        "--config",
        "configs/quickstart.yaml",
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.seq_len=32",
        f"train.steps={STEPS}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "train.log_interval=1",
        "metrics.tensorboard=false",
        "metrics.peak_tflops=1",
        "data.verify_checksums=false",
        "checkpoint.interval=1",  # a save after every step: kills often land inside one
        f"method.name={method}",
        *METHODS[method],
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # log lines arrive as they happen


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    env = ENV
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, **kwargs)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = newest_complete(run_dir / "checkpoints")
    assert found is not None and found.step == STEPS
    return load_full_tensors(found.path, prefix="model.")


def kill_at_random(cmd: list[str], rng: random.Random, *, kills: int) -> list[str]:
    """Start ``cmd``, wait for its first logged step, then kill -9 its whole process group a random moment later,
    ``kills`` times (each restart resumes from the newest complete checkpoint); return what happened."""
    env = ENV
    events = []
    for _ in range(kills):
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for line in proc.stdout:
            if " | loss " in line:
                break
        time.sleep(rng.uniform(0.0, 1.5))  # steps and saves alternate: the kill lands in either
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            events.append("killed")
        else:
            events.append(f"finished before the kill ({proc.returncode})")
        proc.wait()
        proc.stdout.close()
    return events


@pytest.fixture(scope="module")
def references(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("reference")
    out = {}
    for method in METHODS:
        proc = run(command(quickstart_data, tmp / method, method))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[method] = final_weights(tmp / method)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_kill_9_and_resume_ends_bit_identical(method: str, references, quickstart_data: Path, tmp_path: Path):
    rng = random.Random(f"kill-{method}")
    cmd = command(quickstart_data, tmp_path, method)
    events = kill_at_random(cmd, rng, kills=2)
    assert "killed" in events
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
    events = kill_at_random(cut, random.Random("kill-fsdp2"), kills=1)
    assert events == ["killed"]
    proc = run(cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), f"{name} differs after {events}"


def test_sigterm_saves_and_exits_cleanly_then_resumes(references, quickstart_data: Path, tmp_path: Path) -> None:
    cmd = command(quickstart_data, tmp_path, "full", "checkpoint.interval=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until training is under way, then pre-empt it
        lines.append(line)
        if re.search(r"step +3/", line):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1 and 3 <= saved[0].step < STEPS, "".join(lines[-30:])
    assert any("stop signal received" in line for line in lines)
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


def test_asynchronous_saves_commit_and_resume(references, quickstart_data: Path, tmp_path: Path) -> None:
    cmd = command(quickstart_data, tmp_path, "full", "checkpoint.async_save=true", "checkpoint.interval=5")
    first = run([*cmd, "train.steps=12"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert [f.step for f in list_checkpoints(tmp_path / "checkpoints")] == [12, 10, 5]
    weights = final_weights(tmp_path)
    for name, value in references["full"].items():
        assert torch.equal(weights[name], value), name


def test_inspect_and_convert_tools(quickstart_data: Path, tmp_path: Path) -> None:
    proc = run(command(quickstart_data, tmp_path / "run", "relora", "train.steps=3", "checkpoint.interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").write_text("{}")  # damage one
    shown = run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "run")])
    assert shown.returncode == 0, shown.stderr
    assert "step       3 of 3" in shown.stdout and "relora (phase: low rank)" in shown.stdout
    assert "complete   yes" in shown.stdout and "complete   NO:" in shown.stdout and "latest     yes" in shown.stdout
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
