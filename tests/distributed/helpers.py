"""Shared by the distributed tests: the small training config and the multi-process launch of worker.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Losses agree to float rounding (different reduction order); weights after 4 steps to 1e-4 (8-bit: quantisation
# blocks differ with the shard layout).
LOSS_TOL, WEIGHT_TOL, WEIGHT_TOL_8BIT = 1e-4, 1e-4, 2e-3


def base(data: Path, run_dir: Path, micro: int) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.seq_len=32",
        "train.steps=4",
        "train.global_batch_size=8",
        f"train.micro_batch_size={micro}",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "metrics.tensorboard=false",
        "metrics.peak_tflops=1",
        "method.rank=8",
        "method.update_proj_gap=2",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "train.max_grad_norm=1.0",
        "data.verify_checksums=false",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(runs: list[dict], tmp: Path, *, launcher: str = "torchrun") -> dict:
    (tmp / "runs.json").write_text(json.dumps(runs))
    # DeepSpeed's CPU shared-memory all-reduce must not be JIT-built (megatron_pept.distributed): a build would land
    # in this folder.
    extensions = tmp / "torch_extensions"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}
    port = str(free_port())
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", port]
    worker = [str(REPO / "tests/distributed/worker.py"), str(tmp / "runs.json"), str(tmp / "out.pt")]
    proc = subprocess.run([*command, *worker], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not extensions.exists(), f"a C++ extension was compiled during the runs: {sorted(extensions.rglob('*'))}"
    return torch.load(tmp / "out.pt", weights_only=True)


def quantised_bases(model) -> dict:
    """Each quantised layer's fp32 master (``NAME.base_master``) and the base its forward computes with
    (``NAME.dequantized_base``), whole (every rank must call this: sharded parts are gathered)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, module in model.named_modules():
        if getattr(module, "quantised", False):
            master = module._buffers.get("base_master")
            if master is not None:
                out[f"{name}.base_master"] = (master.full_tensor() if isinstance(master, DTensor) else master).cpu()
            out[f"{name}.dequantized_base"] = module.dequantized_base().cpu()
    return out
