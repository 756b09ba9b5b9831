"""Bytes a training run holds per model parameter, by weight dtype, update rule and method (``--suite
param_bytes``): the weights (frozen quantised bases included), the gradients of the trainable ones at their peak
(a global step holds them all at once), and the optimizer's state after a step, counted from the tensors the run
really holds (this rank's part under sharding), not from a formula. fp32 AdamW is the baseline of the ratios."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from megatron_pept.bench.comm import local_bytes

SETTINGS: dict[str, list[str]] = {
    "full fp32 (AdamW)": [],
    "full fp32, bf16 moments": ["optim.state_dtype=bf16"],
    "full bf16 stochastic": ["train.param_dtype=bf16", "optim.weight_update=stochastic"],
    "full bf16 kahan": ["train.param_dtype=bf16", "optim.weight_update=kahan"],
    "full bf16 nearest": ["train.param_dtype=bf16", "optim.weight_update=nearest"],
    "full bf16 stochastic, bf16 moments": ["train.param_dtype=bf16", "optim.state_dtype=bf16"],
    "galore fp32": ["method.name=galore"],
    "galore bf16 stochastic": ["method.name=galore", "train.param_dtype=bf16"],
    "galore_8bit bf16 stochastic": ["method.name=galore_8bit", "train.param_dtype=bf16"],
    "q_galore (int8 weights)": ["method.name=q_galore", "method.weight_group_size=32"],
}


@dataclass(frozen=True)
class ParamBytesSettings:
    model: str = "60m"
    rank: int = 128
    data: str = "data/generated/quickstart"


def measure(overrides: list[str], s: ParamBytesSettings, run_dir: str) -> dict[str, float]:
    from megatron_pept.registry import load_config
    from megatron_pept.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"data.path={s.data}",
            "data.builtin=quickstart",
            f"model.name={s.model}",
            "data.seq_len=32",
            "train.steps=1",
            "train.global_batch_size=1",
            "train.micro_batch_size=1",
            "train.eval_batches=1",
            "train.eval_at_start=false",
            "metrics.tensorboard=false",
            "checkpoint.interval=0",
            f"method.rank={s.rank}" if any(o.startswith("method.name=") for o in overrides) else "method.name=full",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    trainer.train_step()
    model = trainer.raw_model
    weights = sum(local_bytes(p) for p in model.parameters()) + sum(local_bytes(b) for b in model.buffers())
    trainable = [p for _, p in trainer.method.trainable_parameters(model)]
    grads = sum(local_bytes(p) for p in trainable if p.is_floating_point())
    state = sum(local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    # q_galore's int8 layers keep their weight's gradient in fp32 beside the layer (``weight_grad``, freed after the
    # step): a global step holds one per layer at once, 4 bytes a weight.
    grads += sum(4 * m.weight.numel() for m in model.modules() if hasattr(m, "weight_grad"))
    trainer.close()
    n = max(1, sum(p.numel() for p in model.parameters()))
    return {
        "weights_b": weights / n,
        "grads_b": grads / n,
        "state_b": state / n,
        "total_b": (weights + grads + state) / n,
        "parameters_m": n / 1e6,
    }


def run_param_bytes_benchmark(s: ParamBytesSettings) -> dict[str, Any]:
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(SETTINGS.items()):
            runs[name] = measure(overrides, s, f"{tmp}/{i}")
    base = runs["full fp32 (AdamW)"]["total_b"]
    for run in runs.values():
        run["vs_fp32_adamw"] = run["total_b"] / base
    return {"settings": asdict(s), "runs": runs}


def format_param_bytes_result(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"bytes held per model parameter, {s['model']} model (GaLore rank {s['rank']}): weights and frozen bases, "
        "gradients at their peak, optimizer state after a step",
        f"{'setting':<38}{'weights':>9}{'grads':>8}{'state':>8}{'total':>8}{'vs fp32 AdamW':>15}",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"{name:<38}{r['weights_b']:>9.2f}{r['grads_b']:>8.2f}{r['state_b']:>8.2f}{r['total_b']:>8.2f}"
            f"{r['vs_fp32_adamw']:>15.3f}"
        )
    return "\n".join(lines)


__all__ = ["SETTINGS", "ParamBytesSettings", "format_param_bytes_result", "run_param_bytes_benchmark"]
