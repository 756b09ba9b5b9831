"""The memory planner against the allocator (``tools/bench.py --suite planner``): for each configuration, the
planner's peak (``megatron_pept.plan``, fake tensors, planned for this CPU) beside the peak the allocator measured
while the same run was built and trained for the planned number of steps (the study's measurement,
:class:`~megatron_pept.study.memory.AllocatorPeak`: the largest running sum of the profiler's allocation events),
and MemTracker's count over the real run's steps (``tracked``: the tensors the planner counts; a gap between it and
the allocator is memory a backend allocates in its own C++ code, such as gloo's copies of collective buffers).

Each measured run is a fresh process (one, or two under torchrun for FSDP2: rank 0's peak), on the built-in
quickstart data (made on first use; vocabulary 1024). Everything runs in fp32 on the CPU (``train.dtype=fp32``;
weights in bf16 where the case says so), as this CPU computes bf16 100x slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

COMMON = [
    "train.device=cpu",
    "train.dtype=fp32",
    "data.seq_len=128",
    "train.micro_batch_size=4",
    "checkpoint.interval=0",
    "metrics.tensorboard=false",
    "train.eval_at_start=false",
    "metrics.peak_tflops=1",  # no matmul measured for MFU in the measured run
]

CASES: dict[str, tuple[int, list[str]]] = {
    "debug/full": (1, ["model.name=debug", "method.name=full"]),
    "debug/galore": (1, ["model.name=debug", "method.name=galore", "method.rank=16"]),
    "60m/full": (1, ["model.name=60m", "method.name=full"]),
    "60m/lora": (1, ["model.name=60m", "method.name=lora", "method.rank=128"]),
    "60m/relora@nf4": (1, ["model.name=60m", "method.name=relora", "method.rank=128", "method.base_dtype=nf4"]),
    "60m/galore": (1, ["model.name=60m", "method.name=galore", "method.rank=128"]),
    "60m/galore_8bit per-layer": (
        1,
        ["model.name=60m", "method.name=galore_8bit", "method.rank=128", "optim.per_layer=true"],
    ),
    "60m/adam_mini": (1, ["model.name=60m", "method.name=adam_mini"]),
    "60m/apollo_mini": (1, ["model.name=60m", "method.name=apollo_mini"]),
    "60m/full bf16 weights": (1, ["model.name=60m", "method.name=full", "train.param_dtype=bf16"]),
    "60m/q_galore": (1, ["model.name=60m", "method.name=q_galore", "method.rank=128", "method.weight_group_size=32"]),
    "130m/full": (1, ["model.name=130m", "method.name=full"]),
    "130m/galore": (1, ["model.name=130m", "method.name=galore", "method.rank=256"]),
    "130m/relora@nf4": (1, ["model.name=130m", "method.name=relora", "method.rank=128", "method.base_dtype=nf4"]),
    "60m/full fsdp2x2": (2, ["model.name=60m", "method.name=full", "parallel.backend=fsdp2"]),
    "60m/galore fsdp2x2": (2, ["model.name=60m", "method.name=galore", "method.rank=128", "parallel.backend=fsdp2"]),
    "60m/relora@nf4 fsdp2x2": (
        2,
        ["model.name=60m", "method.name=relora", "method.rank=128", "method.base_dtype=nf4", "parallel.backend=fsdp2"],
    ),
    "130m/full fsdp2x2": (2, ["model.name=130m", "method.name=full", "parallel.backend=fsdp2"]),
    "60m/full ddp x2 (computed)": (2, ["model.name=60m", "method.name=full", "parallel.backend=ddp"]),
    "60m/full zero2x2 (computed)": (
        2,
        ["model.name=60m", "method.name=full", "parallel.backend=deepspeed", "parallel.zero_stage=2"],
    ),
}
"""Name -> (ranks, overrides over :data:`COMMON` and the quickstart config)."""


@dataclass
class PlannerCheckSettings:
    cases: tuple[str, ...] = tuple(CASES)
    data: str = "data/generated/quickstart"
    grad_accum_steps: int = 2
    results: list[dict[str, Any]] = field(default_factory=list)


def case_overrides(name: str, *, data: str, grad_accum_steps: int) -> tuple[int, list[str]]:
    ranks, extra = CASES[name]
    return ranks, [*COMMON, f"data.path={data}", f"train.global_batch_size={4 * ranks * grad_accum_steps}", *extra]


def run_planner_check(s: PlannerCheckSettings) -> dict[str, Any]:
    from megatron_pept import registry
    from megatron_pept.data.builtin import ensure_builtin_dataset
    from megatron_pept.plan import PLAN_STEPS, plan

    if s.data == PlannerCheckSettings.data and not (Path(s.data) / "index.json").is_file():
        ensure_builtin_dataset("quickstart", s.data)
    rows = []
    for name in s.cases:
        ranks, overrides = case_overrides(name, data=s.data, grad_accum_steps=s.grad_accum_steps)
        planned = plan(registry.load_config("quickstart", overrides), ranks=ranks)
        measured = measure(overrides, ranks=ranks, steps=PLAN_STEPS)
        rows.append(
            {
                "case": name,
                "ranks": ranks,
                "planned_mb": planned.peak_bytes / 2**20,
                "measured_mb": measured["peak"] / 2**20,
                "tracked_mb": measured["tracked"] / 2**20,
                "error": (planned.peak_bytes - measured["peak"]) / measured["peak"],
                "peak_phase": planned.peak_phase,
                "plan_seconds": planned.seconds,
            }
        )
        print(format_row(rows[-1]), flush=True)
    return {"settings": {**asdict(s), "results": None}, "rows": rows}


def format_row(r: dict[str, Any]) -> str:
    return (
        f"{r['case']:<28}{r['planned_mb']:>12.1f}{r['measured_mb']:>14.1f}{100 * r['error']:>+9.1f}%"
        f"{r['tracked_mb']:>13.1f}  {r['peak_phase']}"
    )


def format_planner_check(result: dict[str, Any]) -> str:
    head = f"{'case':<28}{'planned MB':>12}{'measured MB':>14}{'error':>10}{'tracked MB':>13}  planned peak's phase"
    worst = max((abs(r["error"]) for r in result["rows"]), default=0.0)
    return "\n".join([head, *(format_row(r) for r in result["rows"]), f"largest |error|: {100 * worst:.1f}%"])


def measure(overrides: list[str], *, ranks: int, steps: int) -> dict[str, int]:
    """Rank 0's peaks (bytes) in a fresh process building the run and training ``steps`` steps: ``peak``, the
    allocator's; ``tracked``, MemTracker's over the steps of the real run (the tensors the planner counts, without
    what a backend allocates inside its C++ code: gloo's copies of collective buffers)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        args = [json.dumps([*overrides, f"run_dir={Path(tmp) / 'run'}"]), str(steps), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if ranks == 1:
            command = [sys.executable, "-m", "megatron_pept.bench.planner", *args]
        else:
            from megatron_pept.bench.comm import _free_port

            command = [
                *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)),
                *("--master_port", str(_free_port()), "-m", "megatron_pept.bench.planner", *args),
            ]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the measured run failed:\n{proc.stderr[-4000:]}")
        return {k: int(v) for k, v in json.loads(out.read_text()).items()}


def _measure_worker(overrides: list[str], steps: int, out: Path) -> None:
    import torch

    from megatron_pept import registry
    from megatron_pept.study.memory import AllocatorPeak, tracked_steps
    from megatron_pept.trainer import Trainer

    cfg = registry.load_config("quickstart", overrides)
    with AllocatorPeak(torch.device("cpu")) as measured, Trainer(cfg) as trainer:
        optimizers = [trainer.optimizer]
        with tracked_steps(trainer.raw_model, optimizers, trainer.device, wrapper=trainer.model) as snapshot:
            for _ in range(steps):
                trainer.train_step()
            tracked = sum(snapshot()[0].values())
        rank = trainer.dims.rank
        del trainer
    if rank == 0:
        out.write_text(json.dumps({"peak": measured.peak, "tracked": tracked}))


if __name__ == "__main__":
    _measure_worker(json.loads(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
