"""The throughput benchmark against transformers: it runs, and what it times is the same function twice."""

from __future__ import annotations

import json

import pytest

from megatron_pept.bench import BenchSettings, format_result, run_benchmark
from megatron_pept.errors import ConfigError

pytest.importorskip("transformers")


def test_benchmark_compares_identical_models() -> None:
    settings = BenchSettings(model="debug", vocab_size=512, seq_len=16, batch_size=2, warmup=1, rounds=1, device="cpu")
    result = run_benchmark(settings)
    # Same weights, same batch, same loss code: the two models must agree, or the ratio means nothing.
    assert result.logits_max_abs_diff <= 1e-5
    assert result.loss_abs_diff <= 1e-5
    assert result.grad_max_abs_diff <= 1e-5
    assert result.tokens_per_iter == 32
    assert len(result.ours.seconds) == len(result.hf.seconds) == 1
    assert result.ours_tokens_per_s > 0 and result.hf_tokens_per_s > 0
    assert result.speedup == pytest.approx(result.ours_tokens_per_s / result.hf_tokens_per_s)
    assert len(result.paired_speedups) == 1 and result.paired_speedup > 0
    assert result.dtype == "float32" and result.device == "cpu"
    record = json.loads(json.dumps(result.to_dict()))
    assert record["settings"]["model"] == "debug" and record["speedup"] > 0
    assert "ours / hf" in format_result(result)


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


def test_checkpoint_benchmark_runs_and_reports_ratios(quickstart_data) -> None:
    from megatron_pept.bench_checkpoint import CheckpointBenchSettings, run_checkpoint_benchmark

    result = run_checkpoint_benchmark(CheckpointBenchSettings(model="debug", rounds=1, data=str(quickstart_data)))
    assert result["checkpoint_mb"] > 0
    assert set(result["median_s"]) == {"save_s", "async_blocking_s", "async_total_s", "load_s", "torch_save_s"}
    assert all(v > 0 for v in result["median_s"].values())
    assert result["save_vs_torch_save"] > 0 and result["async_blocking_vs_sync_save"] > 0
