"""Benchmarks of data-parallel training with two gloo processes: bytes communicated per step by method and
backend (``tools/bench.py --suite comm``), and live gradient memory with and without per-layer updates
(``tools/bench.py --suite grad_memory``).

Bytes communicated.
Two processes on gloo train the same model with ``full`` (AdamW) and with a GaLore method under each backend
asked for; every collective the step issues (torch.distributed's and the functional collectives DTensor uses) is
counted. For each run the result gives the bytes of the first step (which computes GaLore's projectors: the
refresh step) and the mean of the following steps (no refresh), as

* ``payload``: the size of the data each collective is about (all-reduce: the tensor; all-gather: the gathered
  result; reduce-scatter: the input; broadcast: the tensor; gather and scatter: every rank's piece together), and
* ``wire``: what one rank sends under ring algorithms: ``2 (w-1)/w`` of an all-reduce's payload, ``(w-1)/w``
  of an all-gather's, reduce-scatter's, gather's or scatter's, the whole of a broadcast, for ``w`` ranks.

Counted per rank (rank 0); both ranks issue the same collectives. The ratio against ``full`` on the same backend
is the number to read: absolute bytes scale with the model, ratios with the method.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


# c10d op -> (kind, index of the argument holding the payload tensors)
_C10D_OPS = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0),
    "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0),
    "reduce_": ("reduce", 0),
    # one rank's piece (the input of a gather, the output of a scatter), the same on every rank: times the world
    "gather_": ("gather", 1),
    "scatter_": ("scatter", 0),
}
_PER_RANK = {"gather", "scatter"}


@dataclass
class CommCounter:
    world: int
    payload: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    wire: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, nbytes: float) -> None:
        w = self.world
        factor = {"all_reduce": 2 * (w - 1) / w, "broadcast": 1.0, "reduce": (w - 1) / w}.get(kind, (w - 1) / w)
        self.payload[kind] += nbytes
        self.wire[kind] += nbytes * factor

    def reset(self) -> None:
        self.payload.clear()
        self.wire.clear()

    def totals(self) -> dict[str, float]:
        return {"payload": sum(self.payload.values()), "wire": sum(self.wire.values())}


def _nbytes(t: Any) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


@contextlib.contextmanager
def count_collectives(world: int) -> Iterator[CommCounter]:
    """Count the bytes of every collective issued inside the block, on this thread.

    Every torch.distributed collective (ours, FSDP2's, DeepSpeed's) dispatches a ``c10d`` operator, seen here by a
    dispatch mode. The functional collectives behind ``DTensor.full_tensor`` do not reach Python dispatch, so
    ``full_tensor`` is counted as an all-gather of the whole tensor.
    """
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    counter = CommCounter(world=world)

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            namespace, _, rest = str(func).partition(".")
            if namespace == "c10d":
                kind, index = _C10D_OPS.get(rest.rsplit(".", 1)[0], (rest.rsplit(".", 1)[0], 0))
                nbytes = _nbytes(args[index] if len(args) > index else None)
                counter.add(kind, nbytes * world if kind in _PER_RANK else nbytes)
            return func(*args, **(kwargs or {}))

    original_full = DTensor.full_tensor

    def full_tensor(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        counter.add("all_gather", self.numel() * self.element_size())
        return original_full(self, *args, **kwargs)

    DTensor.full_tensor = full_tensor  # type: ignore[method-assign]
    try:
        with _Mode():
            yield counter
    finally:
        DTensor.full_tensor = original_full  # type: ignore[method-assign]


@dataclass(frozen=True)
class CommBenchSettings:
    model: str = "60m"
    rank: int = 128
    methods: tuple[str, ...] = ("full", "galore")
    backends: tuple[str, ...] = ("fsdp2", "deepspeed")
    zero_stage: int = 2
    steps: int = 3
    seq_len: int = 128
    data: str = "data/generated/quickstart"
    overrides: tuple[str, ...] = ()
    """Config overrides for every run (``--comm-overrides``), after the benchmark's own."""


def _overrides(s: CommBenchSettings | GradMemorySettings, *, run_dir: str, method: str, backend: str) -> list[str]:
    """The small training run both benchmarks time: one micro-batch of one sequence per rank, no validation."""
    return [
        f"run_dir={run_dir}",
        f"model.name={s.model}",
        f"data.path={s.data}",
        "data.builtin=quickstart",
        f"data.seq_len={s.seq_len}",
        f"train.steps={s.steps}",
        "train.global_batch_size=2",  # one micro-batch per rank: nothing accumulates
        "train.micro_batch_size=1",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "metrics.tensorboard=false",
        "metrics.peak_tflops=1",
        f"method.name={method}",
        f"method.rank={s.rank}",
        f"parallel.backend={backend}",
    ]


def _settings(cls: type, settings_json: str) -> Any:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(settings_json).items()})


def _write_and_exit(results: dict[str, Any], out: str) -> None:
    """Rank 0 writes the results; every rank leaves the process group."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _worker(settings_json: str, out: str) -> None:
    """Runs inside each of the two processes (launched by :func:`run_comm_benchmark`)."""
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    s = _settings(CommBenchSettings, settings_json)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in s.backends:
            for method in s.methods:
                overrides = _overrides(s, run_dir=f"{tmp}/{backend}-{method}", method=method, backend=backend)
                extra = [f"parallel.zero_stage={s.zero_stage}", *s.overrides]
                trainer = Trainer(load_config(None, [*overrides, *extra]))
                world = trainer.dims.world_size
                steps = []
                with count_collectives(world) as counter:
                    for _ in range(s.steps):
                        counter.reset()
                        trainer.train_step()
                        steps.append({"totals": counter.totals(), "wire": dict(counter.wire)})
                param_bytes = sum(p.numel() * p.element_size() for p in trainer.raw_model.parameters())
                results[f"{backend}/{method}"] = {"steps": steps, "param_bytes": param_bytes}
                del trainer
    _write_and_exit(results, out)


def run_comm_benchmark(s: CommBenchSettings) -> dict[str, Any]:
    from dataclasses import asdict

    raw = _launch("comm", asdict(s))
    summary: dict[str, Any] = {"settings": asdict(s), "runs": {}}
    for key, run in raw.items():
        steps = run["steps"]
        later = steps[1:] or steps
        summary["runs"][key] = {
            "param_mb": run["param_bytes"] / 1e6,
            "refresh_step_wire_mb": steps[0]["totals"]["wire"] / 1e6,
            "step_wire_mb": sum(x["totals"]["wire"] for x in later) / len(later) / 1e6,
            "step_payload_mb": sum(x["totals"]["payload"] for x in later) / len(later) / 1e6,
            "step_wire_by_kind_mb": {k: v / 1e6 for k, v in later[-1]["wire"].items()},
        }
    for key, run in summary["runs"].items():
        backend = key.split("/")[0]
        base = summary["runs"].get(f"{backend}/full")
        if base:
            run["step_wire_ratio_vs_full"] = run["step_wire_mb"] / base["step_wire_mb"]
            run["refresh_step_wire_ratio_vs_full"] = run["refresh_step_wire_mb"] / base["step_wire_mb"]
    return summary


def format_comm_result(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"bytes per rank per step, {s['model']} model, 2 ranks (gloo), GaLore rank {s['rank']}, "
        f"ZeRO stage {s['zero_stage']} for deepspeed (wire = ring-algorithm bytes sent per rank)",
        f"{'run':<22}{'step MB':>10}{'vs full':>9}{'refresh step MB':>17}{'vs full':>9}  by collective (step)",
    ]
    for key, r in summary["runs"].items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["step_wire_by_kind_mb"].items()))
        lines.append(
            f"{key:<22}{r['step_wire_mb']:>10.1f}{r.get('step_wire_ratio_vs_full', float('nan')):>9.3f}"
            f"{r['refresh_step_wire_mb']:>17.1f}{r.get('refresh_step_wire_ratio_vs_full', float('nan')):>9.3f}  {kinds}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class GradMemorySettings:
    model: str = "60m"
    methods: tuple[str, ...] = ("full", "galore")
    backends: tuple[str, ...] = ("ddp", "fsdp2")
    rank: int = 128
    steps: int = 2
    seq_len: int = 128
    data: str = "data/generated/quickstart"


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes of the part of ``t`` this process holds (0 for None)."""
    if t is None:
        return 0
    from megatron_pept.sharding import local

    held = local(t)
    return held.numel() * held.element_size()


def track_gradient_peak(model: torch.nn.Module) -> dict[str, int]:
    """Record the most gradient bytes alive at once on this rank during backward (local shards under FSDP2).

    A post-accumulate-grad hook on every parameter sums the bytes of all ``.grad`` alive. Hooks registered earlier
    (per-layer updates) may already have stepped and freed this parameter's gradient, so its own size is added
    back: the peak is the moment just before that free. ``stats["peak"]`` is reset by the caller per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    stats = {"peak": 0}

    def hook(p: torch.Tensor) -> None:
        alive = sum(local_bytes(q.grad) for q in params)
        if p.grad is None:
            alive += local_bytes(p) if p.dtype.is_floating_point else 0
        stats["peak"] = max(stats["peak"], alive)

    for p in params:
        p.register_post_accumulate_grad_hook(hook)
    return stats


def _grad_worker(settings_json: str, out: str) -> None:
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    s = _settings(GradMemorySettings, settings_json)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in s.backends:
            for method in s.methods:
                for per_layer in (False, True):
                    overrides = [
                        *_overrides(s, run_dir=f"{tmp}/{backend}-{method}-{per_layer}", method=method, backend=backend),
                        "train.max_grad_norm=0",
                        f"optim.per_layer={str(per_layer).lower()}",
                    ]
                    trainer = Trainer(load_config(None, overrides))
                    stats = track_gradient_peak(trainer.raw_model)
                    peaks = []
                    for _ in range(s.steps):
                        stats["peak"] = 0
                        trainer.train_step()
                        peaks.append(stats["peak"])
                    trainable = [p for p in trainer.raw_model.parameters() if p.requires_grad]
                    results[f"{backend}/{method}/{'per_layer' if per_layer else 'global'}"] = {
                        "peak_grad_bytes": max(peaks),
                        "all_grads_bytes": sum(local_bytes(p) for p in trainable),
                        "largest_param_bytes": max(local_bytes(p) for p in trainable),
                    }
                    del trainer
    _write_and_exit(results, out)


def run_grad_memory_benchmark(s: GradMemorySettings) -> dict[str, Any]:
    from dataclasses import asdict

    raw = _launch("grad", asdict(s))
    runs = {}
    for key, r in raw.items():
        runs[key] = {
            "peak_grad_mb": r["peak_grad_bytes"] / 1e6,
            "all_grads_mb": r["all_grads_bytes"] / 1e6,
            "largest_param_mb": r["largest_param_bytes"] / 1e6,
            "peak_vs_all_grads": r["peak_grad_bytes"] / r["all_grads_bytes"],
        }
    return {"settings": asdict(s), "runs": runs}


def format_grad_memory_result(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"live gradient bytes per rank during a step, {s['model']} model, 2 ranks (gloo), one micro-batch per rank",
        f"{'run':<30}{'peak MB':>10}{'all grads MB':>14}{'peak / all':>12}{'largest param MB':>18}",
    ]
    for key, r in summary["runs"].items():
        lines.append(
            f"{key:<30}{r['peak_grad_mb']:>10.1f}{r['all_grads_mb']:>14.1f}{r['peak_vs_all_grads']:>12.3f}"
            f"{r['largest_param_mb']:>18.1f}"
        )
    return "\n".join(lines)


def _launch(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run this module's ``kind`` worker in two torchrun processes and return rank 0's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "megatron_pept.bench.comm",
            kind,
            json.dumps(settings),
            str(out),
        ]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark workers failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    {"comm": _worker, "grad": _grad_worker}[sys.argv[1]](sys.argv[2], sys.argv[3])
