"""The benchmarks: the throughput one times the same function twice (ours and transformers', bit for bit), and
what each benchmark reports is what it measured (medians of its rounds, their quotients, the bytes it saved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_pept.bench import BenchSettings, format_result, run_benchmark
from megatron_pept.config import load_config
from megatron_pept.errors import ConfigError
from megatron_pept.trainer import Trainer

pytest.importorskip("transformers")


def test_benchmark_compares_identical_models() -> None:
    settings = BenchSettings(model="debug", vocab_size=512, seq_len=16, batch_size=2, warmup=1, rounds=3, device="cpu")
    result = run_benchmark(settings)
    # Same weights, same batch, same loss code, same SDPA kernel: the two models compute bit for bit the same
    # (docs/benchmarks.md says so of its fp32 runs), or the ratio means nothing.
    assert result.logits_max_abs_diff == result.loss_abs_diff == result.grad_max_abs_diff == 0.0
    assert result.tokens_per_iter == 2 * 16
    assert result.dtype == "float32" and result.device == "cpu"
    # What is reported is what was timed: medians of the three rounds (the middle value) and their quotients.
    ours, hf = result.ours.seconds, result.hf.seconds
    assert len(ours) == len(hf) == 3
    ours_median, hf_median = sorted(ours)[1], sorted(hf)[1]
    assert (result.ours.median_s, result.hf.median_s) == (ours_median, hf_median)
    assert result.ours_tokens_per_s == 32 / ours_median and result.hf_tokens_per_s == 32 / hf_median
    assert result.speedup == pytest.approx(hf_median / ours_median, rel=1e-12)
    pairs = [h / o for o, h in zip(ours, hf)]
    assert result.paired_speedups == pairs and result.paired_speedup == sorted(pairs)[1]
    record = json.loads(json.dumps(result.to_dict()))
    assert record["settings"]["model"] == "debug" and record["settings"]["rounds"] == 3
    assert (record["speedup"], record["paired_speedup"]) == (result.speedup, result.paired_speedup)
    assert record["ours"]["seconds"] == ours and record["hf"]["seconds"] == hf
    table = format_result(result)
    assert f"{result.speedup:.3f}x (>1: ours faster)" in table
    assert f"median {result.paired_speedup:.3f}x over rounds" in table


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(model="3b"), "unknown --model '3b'"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(hf_attn="flash"), "unknown --hf-attn"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_benchmark(BenchSettings(**overrides))


def test_checkpoint_benchmark_reports_what_it_measured(quickstart_data: Path, tmp_path: Path) -> None:
    from megatron_pept.bench.checkpoint import CheckpointBenchSettings, run_checkpoint_benchmark

    result = run_checkpoint_benchmark(CheckpointBenchSettings(model="debug", rounds=3, data=str(quickstart_data)))
    times, medians = result["all_s"], result["median_s"]
    assert set(times) == set(medians) == {"save_s", "async_blocking_s", "async_total_s", "load_s", "torch_save_s"}
    for key, seconds in times.items():
        assert len(seconds) == 3 and medians[key] == sorted(seconds)[1], key
    for blocking, total in zip(times["async_blocking_s"], times["async_total_s"]):
        assert blocking <= total  # the async total includes the part that held the loop
    assert result["save_vs_torch_save"] == medians["save_s"] / medians["torch_save_s"]
    assert result["async_blocking_vs_sync_save"] == medians["async_blocking_s"] / medians["save_s"]
    assert result["save_mb_per_s"] == result["checkpoint_mb"] / medians["save_s"]

    # checkpoint_mb is the size of the torch.save baseline: the debug model and its AdamW state after one step.
    # Make that state here and save it the same way (torch.save names the archive's records after the file).
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "model.name=debug",
            f"data.path={quickstart_data}",
            "train.global_batch_size=1",
            "train.micro_batch_size=1",
            "train.eval_at_start=false",
            "metrics.tensorboard=false",
        ],
    )
    trainer = Trainer(cfg)
    trainer.train_step()
    baseline = tmp_path / "baseline.pt"
    torch.save({"model": trainer.raw_model.state_dict(), "optim": trainer.optimizer.state_dict()}, baseline)
    nbytes = baseline.stat().st_size
    assert result["checkpoint_mb"] == nbytes / 1e6
    # ... which holds every parameter and both of its Adam moments in fp32, plus the format's few kilobytes.
    num_params = sum(p.numel() for p in trainer.raw_model.parameters())
    assert 3 * 4 * num_params < nbytes < 3 * 4 * num_params + 64_000


@pytest.mark.slow  # a process for each base
def test_quant_memory_benchmark_reports_what_the_models_hold(quickstart_data: Path) -> None:
    """Three of the bases, one of each kind (a process each): the bf16 baseline, a quantised base with its fp32
    master on the host, and one without a master; every base's byte count is the same sum over its parts, which
    tests/unit/test_quant.py checks format by format."""
    import math

    from megatron_pept.bench.quant import (
        BASES,
        QuantMemorySettings,
        format_quant_memory_result,
        run_quant_memory_benchmark,
    )
    from megatron_pept.config import ModelConfig
    from megatron_pept.models import build_model, llama_args
    from megatron_pept.quant import part_shapes

    rank = 16
    bases = ("bf16", "int8", "nf4/none")
    settings = QuantMemorySettings(
        model="debug", steps=2, batch_size=1, seq_len=32, rank=rank, data=str(quickstart_data), bases=bases
    )
    result = run_quant_memory_benchmark(settings)
    runs = result["runs"]
    assert list(runs) == list(bases)

    # The frozen base each run must hold, from the model's shapes and megatron_pept.quant.part_shapes alone.
    args = llama_args(ModelConfig(name="debug"), vocab_size=runs["bf16"]["vocab_size"], max_seq_len=32)
    h, kv, ff = args.hidden_size, args.num_kv_heads * args.head_dim, args.intermediate_size
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)] * args.num_layers
    weights = sum(rows * cols for rows, cols in shapes)

    def quantised(fmt: str) -> int:
        return sum(math.prod(shape) * dtype.itemsize for s in shapes for shape, dtype in part_shapes(fmt, s).values())

    expected = {
        "bf16": 2 * weights,
        "fp32": 4 * weights,
        "int8": quantised("int8") + 4 * weights,  # the parts and the fp32 master
        "int8/none": quantised("int8"),
        "nf4": quantised("nf4") + 4 * weights,
        "nf4/none": quantised("nf4"),
    }
    assert {base: run["frozen_base_bytes"] for base, run in runs.items()} == {base: expected[base] for base in bases}
    assert {base: run["master_bytes"] for base, run in runs.items()} == {
        base: 4 * weights if BASES[base][1] == "host" else 0 for base in bases
    }
    frozen = {base: run["frozen_base_bytes"] for base, run in runs.items()}
    assert expected["nf4/none"] < expected["int8/none"] < expected["bf16"] < expected["fp32"]

    # What trains is the same for every base: the adapters, and everything of the dense model but the projections.
    with torch.device("meta"):
        dense_params = sum(p.numel() for p in build_model(args).parameters())
    adapters = sum(rank * (rows + cols) for rows, cols in shapes)
    trainable = 4 * (dense_params - weights + adapters)
    for base, run in runs.items():
        assert run["trainable_bytes"] == trainable, base
        assert 2 * trainable <= run["optimizer_state_bytes"] < 2 * trainable + 4096, base  # AdamW's two moments
        assert run["peak_rss_bytes"] > 0 and run["build_peak_rss_bytes"] <= run["peak_rss_bytes"], base
        assert run["train_peak_rss_bytes"] is None or 0 < run["train_peak_rss_bytes"] <= run["peak_rss_bytes"]
        assert run["peak_rss_bytes"] > run["frozen_base_bytes"] + run["trainable_bytes"], base
        seconds = run["step_seconds"]
        assert len(seconds) == 2 and all(t > 0 for t in seconds), base
        assert run["median_step_seconds"] == run["min_step_seconds"] == seconds[1], base  # the first is not timed
        ratios = run["vs_bf16"]
        assert ratios["frozen_base_bytes"] == frozen[base] / frozen["bf16"], base
        assert ratios["peak_rss_bytes"] == run["peak_rss_bytes"] / runs["bf16"]["peak_rss_bytes"], base
        assert ratios["median_step_seconds"] == run["median_step_seconds"] / runs["bf16"]["median_step_seconds"]
        assert ratios["min_step_seconds"] == run["min_step_seconds"] / runs["bf16"]["min_step_seconds"]
    record = json.loads(json.dumps(result))
    assert record["runs"]["nf4/none"]["frozen_base_bytes"] == expected["nf4/none"]

    table = format_quant_memory_result(result).splitlines()
    rows = [line for line in table if line.startswith(("| bf16", "| fp32", "| int8", "| nf4"))]
    assert len(rows) == len(bases)
    assert rows[0].startswith("| bf16 | - | ") and "(1.000x)" in rows[0]
    assert rows[2].startswith("| nf4 | none | ")


def test_quant_memory_settings_are_checked() -> None:
    from megatron_pept.bench.quant import QuantMemorySettings, run_quant_memory_benchmark

    with pytest.raises(ConfigError, match="--steps must be at least 2"):
        run_quant_memory_benchmark(QuantMemorySettings(model="debug", steps=1))
    with pytest.raises(ConfigError, match="must include the baseline 'bf16'"):
        run_quant_memory_benchmark(QuantMemorySettings(model="debug", bases=("int8",)))


def test_family_benchmark_counts_every_byte_the_optimizers_hold() -> None:
    """The family benchmark on the debug model: AdamW's state is exactly two fp32 moments and a step counter per
    parameter; GaLore and Fira hold an r x min(m, n) projector per matrix in their state; APOLLO's projectors are
    counted beside the state (held, not checkpointed) at exactly that size; APOLLO-Mini holds rank-1 moments only."""
    from megatron_pept.bench.optim import FAMILY, OptimBenchSettings, bench_family
    from megatron_pept.config import ModelConfig
    from megatron_pept.models import llama_args

    rank = 4
    out = bench_family(OptimBenchSettings(model="debug", rank=rank, rounds=1, vocab_size=256))
    args = llama_args(ModelConfig(name="debug"), vocab_size=256)
    h, kv, ff = args.hidden_size, args.num_kv_heads * args.head_dim, args.intermediate_size
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)] * args.num_layers
    projector_bytes = sum(4 * rank * min(shape) for shape in shapes)
    matrix_bytes = sum(4 * m * n for m, n in shapes)
    n_params = 2 + args.num_layers * 9 + 1  # embedding, final norm, lm_head; 7 matrices and 2 norms per block
    full, galore, apollo, mini, fira, muon, normuon, dion = (out[name] for name in FAMILY)
    assert full["state_bytes"] == 2 * out["weight_bytes"] + 4 * n_params
    assert galore["projected_weight_bytes"] == matrix_bytes == apollo["projected_weight_bytes"]
    assert galore["held_projector_bytes"] == fira["held_projector_bytes"] == 0
    assert apollo["held_projector_bytes"] == projector_bytes
    # APOLLO's state is GaLore's less its projectors (and a limiter norm per matrix): the moments are the same size
    assert apollo["projected_state_bytes"] + projector_bytes == galore["projected_state_bytes"] + 4 * len(shapes)
    assert mini["held_projector_bytes"] == sum(4 * min(shape) for shape in shapes)
    assert mini["projected_state_bytes"] + mini["held_projector_bytes"] < 0.05 * matrix_bytes
    assert mini["state_vs_galore"] < apollo["state_vs_galore"] < 1.0 < full["state_vs_galore"]
    # The Muon family: one fp32 momentum per matrix element (half of Adam's two moments) and a step counter;
    # NorMuon one second moment per row; Dion a right factor n x r (r = a quarter of the smaller side) and a seed
    counters = 4 * len(shapes)
    assert muon["projected_state_bytes"] == matrix_bytes + counters
    assert normuon["projected_state_bytes"] == matrix_bytes + counters + sum(4 * m for m, _ in shapes)
    factors = sum(4 * n * max(1, round(0.25 * min(m, n))) for m, n in shapes)
    assert dion["projected_state_bytes"] == matrix_bytes + counters + factors + 8 * len(shapes)
    assert muon["ortho_vs_galore_refresh"] is not None
    for name in FAMILY:
        assert out[name]["step_seconds"] > 0
        assert out[name]["state_vs_adamw"] == pytest.approx(out[name]["state_bytes"] / full["state_bytes"])
