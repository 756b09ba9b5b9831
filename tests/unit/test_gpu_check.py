"""The GPU acceptance check (tools/gpu_check.py): its dry run goes through every row on CPU and reports finite
numbers; without CUDA the real check is one line and exit 0; a row below its target FAILs and fails the exit
status; the attention comparison of a kernel with itself is exact."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_pept.bench.gpu_check import (
    DRY,
    FAIL,
    NO_CUDA_LINE,
    PASS,
    SKIP,
    GpuCheckResult,
    GpuCheckSettings,
    Row,
    Target,
    amortised_seconds,
    attention_references,
    bf16_bound,
    compare_attention_backend,
    exit_code,
    format_table,
    resolve_status,
)

REPO = Path(__file__).resolve().parents[2]
ROW_IDS = [
    "memory/galore_8bit_per_layer",
    "galore_8bit/step",
    "attention/flash",
    "attention/te",
    *(f"throughput/{m}/{b}" for b in ("single", "fsdp2") for m in ("full", "galore", "relora")),
]


def _run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU paths, even on a machine with a GPU
    return subprocess.run(
        [sys.executable, "tools/gpu_check.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_produces_every_row_with_finite_numbers(quickstart_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = _run_tool("--dry-run", "--json", str(out), "--data", str(quickstart_data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["mode"] == "dry-run" and record["exit_code"] == 0
    rows = {r["id"]: r for r in record["rows"]}
    assert list(rows) == ROW_IDS
    for row_id, row in rows.items():
        if row_id.startswith("attention/"):  # flash-attn and transformer-engine cannot be installed on a CPU machine
            assert row["status"] == SKIP and row["measured"] in ("not installed", "needs CUDA"), row
            continue
        if row_id.startswith(("memory/", "galore_8bit/")) and row["skipped"]:  # bitsandbytes is an extra
            pytest.importorskip("bitsandbytes")
        assert row["status"] == DRY, row
        assert row["checks"] and all(math.isfinite(c["value"]) for c in row["checks"]), row
        numbers = [v for v in row["metrics"].values() if isinstance(v, int | float)]
        assert numbers and all(math.isfinite(v) for v in numbers), row
    # What each row measured is what it reports.
    full = rows["throughput/full/single"]["metrics"]
    assert full["tokens_per_s"] == pytest.approx(full["tokens_per_step"] / full["median_step_seconds"])
    galore = rows["throughput/galore/single"]["metrics"]
    assert galore["amortised_step_seconds"] == pytest.approx(
        galore["median_step_seconds"] + galore["refresh"]["seconds"] / 200
    )
    assert galore["vs_full"] == pytest.approx(galore["tokens_per_s"] / full["tokens_per_s"])
    relora = rows["throughput/relora/single"]["metrics"]
    assert len(relora["step_seconds"]) == 3 and relora["restart_index"] == 1  # 1 warm-up + 2 timed, restart timed
    if "bitsandbytes" not in (rows["galore_8bit/step"]["skipped"] or ""):
        assert rows["galore_8bit/step"]["metrics"]["uint8_states_on_device"] > 0
    # The one table: every row on stdout, the targets marked dry, nothing else but its title and summary.
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check (DRY RUN on CPU") and lines[-1].endswith("exit 0")
    assert len(lines) == 3 + len(ROW_IDS) + 1
    assert "dry (MFU >= 45%)" in proc.stdout and "dry (>= 0.95x full)" in proc.stdout
    assert "dry (>= 1.05x full)" in proc.stdout and "dry (< 22 GB)" in proc.stdout


@pytest.mark.slow  # a process
def test_without_cuda_the_real_check_is_one_line_and_exit_0(tmp_path: Path) -> None:
    out = tmp_path / "skip.json"
    proc = _run_tool("--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [NO_CUDA_LINE]
    assert json.loads(out.read_text())["skipped"] == "no CUDA device"


def _row(value: float, target: Target, **kwargs) -> Row:
    return Row(id="t", check="t", checks=[(target, value)], **kwargs)


def test_a_row_below_its_target_fails_and_fails_the_exit_status() -> None:
    ratio = Target(">=", 0.95, ">= 0.95x full")
    memory = Target("<", 22.0, "< 22 GB")
    assert resolve_status(_row(0.94, ratio), dry=False) == FAIL
    assert resolve_status(_row(0.95, ratio), dry=False) == PASS
    assert resolve_status(_row(22.0, memory), dry=False) == FAIL
    assert resolve_status(_row(21.9, memory), dry=False) == PASS
    # Every check of a row must hold.
    two = Row(id="t", check="t", checks=[(ratio, 1.0), (memory, 30.0)])
    assert resolve_status(two, dry=False) == FAIL
    # Not judged: a dry run, a target that does not apply on this GPU, a package not installed.
    assert resolve_status(_row(0.5, ratio), dry=True) == DRY
    assert resolve_status(_row(0.5, ratio, judged=False), dry=False) == SKIP
    assert resolve_status(Row(id="t", check="t", skipped="not installed"), dry=False) == SKIP
    # An error or a non-finite number fails, in a dry run too (the plumbing is broken).
    assert resolve_status(_row(1.0, ratio, error="RuntimeError: boom"), dry=True) == FAIL
    assert resolve_status(_row(math.nan, ratio), dry=True) == FAIL
    assert resolve_status(_row(math.inf, memory), dry=False) == FAIL
    rows = [_row(1.0, ratio), Row(id="s", check="s", skipped="not installed"), _row(0.9, ratio)]
    for row in rows:
        row.status = resolve_status(row, dry=False)
    assert [r.status for r in rows] == [PASS, SKIP, FAIL] and exit_code(rows) == 1
    assert exit_code(rows[:2]) == 0
    # The arithmetic the ratios rest on.
    assert amortised_seconds(0.5, one_off_seconds=20.0, every=200) == pytest.approx(0.6)
    assert amortised_seconds(0.5, one_off_seconds=-0.1, every=200) == 0.5  # a restart faster than a step adds 0
    assert bf16_bound(0.1, 1.0) == pytest.approx(0.2) and bf16_bound(0.0, 4.0) == pytest.approx(4 * 2**-6)


def test_a_failing_row_makes_the_tool_exit_1(monkeypatch, tmp_path: Path, capsys) -> None:
    from megatron_pept.bench import gpu_check
    from megatron_pept.tools.gpu_check import main

    def fake_run(settings: GpuCheckSettings) -> GpuCheckResult:
        row = _row(0.90, Target(">=", 0.95, ">= 0.95x full"), measured="0.900x full")
        row.status = resolve_status(row, dry=False)
        return GpuCheckResult(settings=settings, device="fake", torch_version="x", rows=[row], seconds=0.0)

    monkeypatch.setattr(gpu_check, "run_gpu_check", fake_run)
    out = tmp_path / "fail.json"
    assert main(["--dry-run", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "| FAIL" in printed and printed.strip().endswith("exit 1")
    record = json.loads(out.read_text())
    assert record["exit_code"] == 1 and record["rows"][0]["checks"][0]["met"] is False


def test_comparing_a_kernel_with_itself_is_exact_and_table_formats() -> None:
    from megatron_pept.bench.gpu_check import _materialised

    model = _materialised("debug", vocab_size=128, max_seq_len=16, device=torch.device("cpu")).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    refs = attention_references(model, ids, dtype="bf16")
    assert refs["logits_noise"] > 0  # bf16 rounds
    result = compare_attention_backend(model, ids, backend="sdpa", refs=refs, dtype="bf16")
    assert result["logits_max_abs_diff"] == 0.0 and result["kernel_max_abs_diff"] <= result["kernel_bound"]
    assert result["logits_bound"] >= 2 * refs["logits_noise"]
    # The swap is undone: the model's kernels are its own again.
    assert all(type(layer.self_attn.core).__name__ == "SDPAAttention" for layer in model.model.layers.values())
    settings = GpuCheckSettings.for_dry_run()
    row = _row(0.2, Target("<=", 0.5, "logits <= 0.5"), measured="logits max|diff| 0.2")
    row.status = resolve_status(row, dry=True)
    table = format_table(GpuCheckResult(settings=settings, device="cpu", torch_version="x", rows=[row], seconds=1))
    assert "dry (logits <= 0.5)" in table and "| dry" in table


class _NonCausal(torch.nn.Module):
    """A broken kernel: attention without the causal mask."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@pytest.mark.parametrize("kernel,status", [("sdpa", PASS), ("non_causal", FAIL)])
def test_an_installed_attention_kernel_is_judged_and_a_wrong_one_fails(monkeypatch, kernel: str, status: str) -> None:
    """The row a GPU run makes for an installed flash-attn, made on CPU: "flash" is given a kernel here."""
    from megatron_pept.bench import gpu_check
    from megatron_pept.models import attention

    # Patched in the module attention_rows reads it from.
    monkeypatch.setattr(gpu_check.attention, "ATTENTION_PACKAGES", {"flash": "torch", "te": "no_such_package_here"})
    sdpa = attention.build_core_attention

    def build(backend: str, **kwargs) -> torch.nn.Module:
        return sdpa("sdpa", **kwargs) if kernel == "sdpa" or backend == "sdpa" else _NonCausal()

    monkeypatch.setattr(attention, "build_core_attention", build)
    settings = GpuCheckSettings.for_dry_run(dry_run=False, threads=None)  # judged as on a GPU, on CPU
    rows = gpu_check.attention_rows(settings, log=lambda message: None)
    for row in rows:
        row.status = resolve_status(row, dry=False)
    assert [(r.id, r.status) for r in rows] == [("attention/flash", status), ("attention/te", SKIP)]
    assert rows[1].measured == "not installed"
    flash = rows[0].metrics
    if kernel == "sdpa":
        assert flash["logits_max_abs_diff"] == 0.0
    else:  # the kernel check catches what the logits of a random-init model may hide
        assert flash["kernel_max_abs_diff"] > 10 * flash["kernel_bound"]
