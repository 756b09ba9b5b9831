"""Memory and step time of ReLoRA training per frozen-base storage (``tools/bench.py --suite quant_memory``).

For each base setting of :data:`BASES` (``bf16``, ``fp32``, ``int8`` and ``nf4`` with the exact fp32 master
``method.base_master=host`` and without one, ``none``) a fresh Python process builds the real
:class:`~megatron_pept.trainer.Trainer` for ``method.name=relora`` (rank ``rank``, no warm start, so the layers hold
the base the low-rank way from the first step; the default ``reset_every``, so no restart happens in a few steps)
on the built-in quickstart data and trains ``steps`` steps of ``batch_size x seq_len`` tokens. Each process reports:

* ``peak_rss``: its peak resident memory (``VmHWM``) over the whole run, building the trainer included;
* ``train_peak_rss``: the peak over the training steps only (the peak is reset with ``/proc/self/clear_refs``
  once the trainer is built; None where the kernel refuses), what training holds without the one-off cost of
  initialising the weights and quantising them;
* ``frozen_base_bytes``: what the model holds of the frozen base, summed over its ``LowRankLinear`` layers: the
  dense ``weight`` where there is one and every ``base_*`` buffer (the quantised parts and, with
  ``base_master=host|device``, the fp32 master ``base_master``, also counted on its own as ``master_bytes``);
* ``trainable_bytes`` and ``optimizer_state_bytes``: the parameters that train (adapters, embeddings, norms, LM
  head) and their optimizer state, the same for every base;
* ``step_seconds``: every step's wall time; the median and the fastest of those after the first are reported
  (with the 1-minute load average at the end, ``load_average_after``: on a shared machine other work slows some
  steps, and the fastest step is the one least disturbed).

Every number is also given as a ratio to the ``bf16`` row, measured by the same script. On a CPU run the "host"
master sits in the same memory as everything else, so only ``base_master=none`` can lower the peak there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_pept.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# label -> (method.base_dtype, method.base_master or None for a dense base); the first row is the baseline.
BASES: dict[str, tuple[str, str | None]] = {
    "bf16": ("bf16", None),
    "fp32": ("fp32", None),
    "int8": ("int8", "host"),
    "int8/none": ("int8", "none"),
    "nf4": ("nf4", "host"),
    "nf4/none": ("nf4", "none"),
}
BASELINE = "bf16"
MIB = 1 << 20


@dataclass(frozen=True)
class QuantMemorySettings:
    model: str = "350m"
    steps: int = 4
    batch_size: int = 1
    seq_len: int = 256
    rank: int = 128
    threads: int | None = None
    bases: tuple[str, ...] = tuple(BASES)
    data: str = "data/generated/quickstart"

    def validate(self) -> None:
        from megatron_pept.models import MODEL_SHAPES

        if self.model not in MODEL_SHAPES:
            raise ConfigError(f"unknown --model {self.model!r}; choose one of {', '.join(MODEL_SHAPES)}")
        if self.steps < 2:
            raise ConfigError(f"--steps must be at least 2 (the first step is not timed), got {self.steps}")
        for name, value in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len), ("--rank", self.rank)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        unknown = [b for b in self.bases if b not in BASES]
        if unknown:
            raise ConfigError(f"unknown base {', '.join(unknown)}; choose from {', '.join(BASES)}")
        if BASELINE not in self.bases:
            raise ConfigError(f"the bases must include the baseline {BASELINE!r}")


# -- peak resident memory of a process (Linux) -----------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (``VmHWM``) to its current one; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started or since :func:`reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory is measured on Linux only)")


def run_fresh_process(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m module *args OUT`` in a new process (so its peak memory is its own) and return the JSON
    it wrote to the path ``OUT`` it is given last."""
    with tempfile.TemporaryDirectory(prefix="bench_fresh") as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, "-m", module, *args, str(out)], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark process {module} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# -- what the model holds --------------------------------------------------------------------------------------


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def frozen_base_bytes(model: Any) -> tuple[int, int]:
    """(all bytes of the frozen base, of which the fp32 master) over the model's ``LowRankLinear`` layers: the
    dense ``weight`` where there is one plus every ``base_*`` buffer."""
    from megatron_pept.methods.lowrank import LowRankLinear

    total = master = 0
    for layer in model.modules():
        if not isinstance(layer, LowRankLinear):
            continue
        total += _nbytes(layer.weight)
        for name, buffer in layer.named_buffers(recurse=False):
            if name.startswith("base_"):
                total += _nbytes(buffer)
                if name == "base_master":
                    master += _nbytes(buffer)
    return total, master


def _overrides(s: QuantMemorySettings, *, run_dir: str, base: str) -> list[str]:
    """The run each process trains: one micro-batch per step, no validation, no checkpoints."""
    base_dtype, base_master = BASES[base]
    data = Path(s.data) if Path(s.data).is_absolute() else REPO / s.data
    return [
        f"run_dir={run_dir}",
        f"model.name={s.model}",
        f"data.path={data}",
        f"data.seq_len={s.seq_len}",
        f"train.steps={s.steps}",
        f"train.global_batch_size={s.batch_size}",
        f"train.micro_batch_size={s.batch_size}",
        "train.device=cpu",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "metrics.tensorboard=false",
        "metrics.peak_tflops=1",
        "method.name=relora",
        f"method.rank={s.rank}",
        "method.warm_start_steps=0",
        f"method.base_dtype={base_dtype}",
        *([f"method.base_master={base_master}"] if base_master else []),
    ]


def _worker(settings_json: str, base: str, out: str) -> None:
    """One base setting, in its own process (launched by :func:`run_quant_memory_benchmark`)."""
    reset_peak_rss()
    import torch

    from megatron_pept.bench.optim import state_bytes
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    raw = json.loads(settings_json)
    s = QuantMemorySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="bench_quant") as tmp:
        trainer = Trainer(load_config(None, _overrides(s, run_dir=f"{tmp}/run", base=base)))
        build_peak = peak_rss_bytes()
        resettable = reset_peak_rss()
        seconds = []
        for _ in range(s.steps):
            start = time.perf_counter()
            trainer.train_step()
            seconds.append(time.perf_counter() - start)
        train_peak = peak_rss_bytes() if resettable else None
        model = trainer.raw_model
        frozen, master = frozen_base_bytes(model)
        result = {
            "base": base,
            "peak_rss_bytes": max(build_peak, train_peak or peak_rss_bytes()),
            "build_peak_rss_bytes": build_peak,
            "train_peak_rss_bytes": train_peak,
            "frozen_base_bytes": frozen,
            "master_bytes": master,
            "trainable_bytes": sum(_nbytes(p) for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": state_bytes(trainer.optimizer),
            "step_seconds": seconds,
            "load_average_after": os.getloadavg()[0],  # other work on the machine slows the steps
            "threads": torch.get_num_threads(),
            "vocab_size": trainer.model_args.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        trainer.close()
    Path(out).write_text(json.dumps(result))


def run_quant_memory_benchmark(s: QuantMemorySettings) -> dict[str, Any]:
    """Train each base setting in a fresh process, one after the other; see the module docstring."""
    s.validate()
    import torch

    from megatron_pept.data.builtin import ensure_builtin_dataset

    data = Path(s.data) if Path(s.data).is_absolute() else REPO / s.data
    ensure_builtin_dataset("quickstart", data)  # here, once, not inside a measured process
    settings_json = json.dumps(asdict(s))
    runs: dict[str, dict[str, Any]] = {}
    for base in s.bases:
        raw = run_fresh_process("megatron_pept.bench.quant", settings_json, base)
        timed = raw["step_seconds"][1:]
        runs[base] = {**raw, "median_step_seconds": statistics.median(timed), "min_step_seconds": min(timed)}
    ref = runs[BASELINE]
    for run in runs.values():
        run["vs_" + BASELINE] = {
            key: (run[key] / ref[key] if run[key] is not None and ref[key] else None)
            for key in (
                "peak_rss_bytes",
                "train_peak_rss_bytes",
                "frozen_base_bytes",
                "trainable_bytes",
                "optimizer_state_bytes",
                "median_step_seconds",
                "min_step_seconds",
            )
        }
    return {"settings": asdict(s), "torch": torch.__version__, "runs": runs}


def format_quant_memory_result(result: dict[str, Any]) -> str:
    s, runs = result["settings"], result["runs"]
    first = next(iter(runs.values()))
    lines = [
        f"ReLoRA (rank {s['rank']}, no warm start), {s['model']} model ({first['parameters'] / 1e6:.1f}M "
        f"parameters, vocab {first['vocab_size']}), {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens "
        f"on CPU ({first['threads']} threads), each base in a fresh process; torch {result['torch']}; "
        f"ratios against {BASELINE}",
        "",
        "| base | master | peak RSS MiB | train-step peak MiB | frozen base MiB | of it master MiB "
        "| trainable + optim MiB | median step s | fastest step s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(value: float | None, ratio: float | None, fmt: str = ".0f") -> str:
        if value is None:
            return "-"
        return f"{value:{fmt}} ({ratio:.3f}x)" if ratio is not None else f"{value:{fmt}}"

    for base, r in runs.items():
        ratio = r["vs_" + BASELINE]
        train_peak = r["train_peak_rss_bytes"]
        master = BASES[base][1] or "-"
        lines.append(
            f"| {BASES[base][0]} | {master} "
            f"| {cell(r['peak_rss_bytes'] / MIB, ratio['peak_rss_bytes'])} "
            f"| {cell(train_peak / MIB if train_peak is not None else None, ratio['train_peak_rss_bytes'])} "
            f"| {cell(r['frozen_base_bytes'] / MIB, ratio['frozen_base_bytes'], '.1f')} "
            f"| {r['master_bytes'] / MIB:.1f} "
            f"| {(r['trainable_bytes'] + r['optimizer_state_bytes']) / MIB:.1f} "
            f"| {cell(r['median_step_seconds'], ratio['median_step_seconds'], '.2f')} "
            f"| {cell(r['min_step_seconds'], ratio['min_step_seconds'], '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3])
