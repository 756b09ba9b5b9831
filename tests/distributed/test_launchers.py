"""The launchers for real: two torchrun "nodes" on one machine (c10d rendezvous on 127.0.0.1) train and match one
process; every launch script parses (the SLURM one runs for real in tests/e2e/test_slurm.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pept.config import load_config
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

    result = run_comm_benchmark(CommBenchSettings(model="debug", rank=8, steps=2, data=str(quickstart_data)))
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
