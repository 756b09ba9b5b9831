"""The real entry point in a subprocess: the quickstart trains and logs; bad input is one line, non-zero."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import ENV, QUICKSTART, REPO, run, train_command


def run_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return run(train_command(*args, config=None), cwd=cwd)


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_quickstart_trains_and_writes_tensorboard(quickstart_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run(train_command(f"run_dir={run_dir}", "train.steps=30", f"data.path={quickstart_data}"))
    assert proc.returncode == 0, proc.stderr
    assert "step 30/30" in proc.stdout and "val_loss" in proc.stdout
    tb = scalars(run_dir)
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/ppl",
        "perf/tokens_per_sec",
        "perf/mfu",
        "mem/peak_gb",
    ):
        assert tag in tb, tag
    loss = tb["train/loss"]
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 1.0
    assert tb["val/loss"][-1] < tb["val/loss"][0]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 30 and resolved["model"]["name"] == "debug"


def test_quickstart_generates_its_own_data(tmp_path: Path) -> None:
    """From nothing but the repo: the built-in corpus is generated, tokenized and trained on."""
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data'}", "train.steps=2"]
    proc = run(train_command(*overrides, "train.eval_batches=1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "index.json").is_file()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("no_such_key=1", "unknown config key 'no_such_key'"),
        ("optim.lr=abc", "config key 'optim.lr' expects a number"),
        ("method.name=lorra", "did you mean 'lora'?"),
    ],
)
def test_bad_overrides_are_one_line_and_exit_2(override: str, expected: str, tmp_path: Path) -> None:
    proc = run(train_command(f"run_dir={tmp_path}", override))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "config.yaml").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock files' holder notes (each run that takes a lock writes who it is)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".megatron_pept.lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_refused_runs_write_nothing(quickstart_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run refused after its config parsed (data, shape, checkpoint or method checks) leaves run_dir as it was:
    no config.yaml, no event file, no checksum cache; a new run_dir is not even created. The first refusal and the
    run are the CLI; the refusals of the finished run_dir are the same entry point called in this process (its
    exit code and its one line), which spares four interpreter and torch start-ups."""
    common = ["--config", QUICKSTART, f"data.path={quickstart_data}", "train.eval_batches=1"]
    fresh = tmp_path / "fresh"
    proc = run_train(*common, f"run_dir={fresh}", "model.vocab_size=100")  # smaller than the tokenizer's
    assert proc.returncode == 2 and "smaller than the data's tokenizer vocabulary" in proc.stderr
    assert not fresh.exists()

    run_dir = tmp_path / "run"
    proc = run_train(*common, f"run_dir={run_dir}", "train.steps=2", "checkpoint.interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = snapshot(run_dir)
    assert "config.yaml" in before and any("tfevents" in name for name in before)
    from megatron_pept.train import main

    capsys.readouterr()
    for refused, message in (
        (["checkpoint.resume=none"], "already holds checkpoints"),
        (["method.name=relora", "method.rank=4"], "was saved with method.name=full"),
        (["model.hidden_size=96"], "but this run builds"),
        (["model.vocab_size=2048"], "but this run builds"),
    ):
        code = main([*common, f"run_dir={run_dir}", "train.steps=4", *refused])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err[-3000:]
        assert [line for line in err.splitlines() if line.startswith("megatron_pept: ")] == [err.strip()], err
        assert snapshot(run_dir) == before, refused


def test_missing_data_is_one_line(tmp_path: Path) -> None:
    proc = run_train(f"run_dir={tmp_path / 'r'}", f"data.path={tmp_path / 'none'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_help_and_config_listing() -> None:
    assert run_train("--help").returncode == 0
    listing = run_train("--help-config")
    assert listing.returncode == 0 and "optim.per_layer" in listing.stdout and "Peak learning rate" in listing.stdout
    printed = run(train_command("--print-config", "train.steps=7"))
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["train"]["steps"] == 7


def test_console_script_is_installed() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("megatron-pept-train")), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--config" in proc.stdout


def test_deepspeed_backend_runs_as_one_plain_process(quickstart_data: Path, tmp_path: Path) -> None:
    """``python -m megatron_pept.train parallel.backend=deepspeed`` without any launcher: DeepSpeed must not fall
    back to MPI discovery (mpi4py is not a dependency) and one ZeRO rank trains like the single backend."""
    import os
    import re

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with socket.socket() as sock:  # a free port, not a fixed one another job on this host may hold
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(sock.getsockname()[1])
    common = ["train.steps=3", f"data.path={quickstart_data}"]
    losses = {}
    for backend in ("single", "deepspeed"):
        proc = run(train_command(*common, f"run_dir={tmp_path / backend}", f"parallel.backend={backend}"), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[backend] = float(re.search(r"step 3/3 \| loss ([0-9.]+)", proc.stdout).group(1))
    assert losses["deepspeed"] == pytest.approx(losses["single"], abs=2e-4)


def test_gpu_attention_on_a_cpu_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """`python -m megatron_pept.train --config configs/quickstart.yaml model.attention=flash` on a machine without
    CUDA (none visible here, whatever the machine): exit 2, one line naming the CPU and the fix, and nothing
    written: not the quickstart's data (generated on first use, relative to the working folder), not run_dir."""
    proc = run(train_command("model.attention=flash"), cwd=tmp_path, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.attention=flash runs on CUDA GPUs only" in lines[0], proc.stderr
    assert "use model.attention=sdpa" in lines[0]
    assert list(tmp_path.iterdir()) == []
