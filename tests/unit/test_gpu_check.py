"""The GPU acceptance check (tools/gpu_check.py): its dry run goes through every row on CPU and reports finite
numbers; without CUDA the real check is one line, exit 2 and nothing written (a GPU job that lost its GPU must not
pass); a row below its target FAILs and fails the exit status; the attention comparison of a kernel with itself is
exact; transformer-engine counts as there only when transformer_engine.pytorch imports, and a package that does
not import SKIPs only its own rows; the galore_8bit row sees bitsandbytes' own kernels run."""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import subprocess
import sys
import types
import warnings
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
    # The module the console script megatron-pept-gpu-check runs (tools/gpu_check.py calls the same main), from the
    # repository root: this checkout's package, whatever else is installed.
    return subprocess.run(
        [sys.executable, "-m", "megatron_pept.tools.gpu_check", *args],
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
            assert row["status"] == SKIP and row["measured"] in ("not installed", "does not import", "needs CUDA"), row
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
    memory = rows["memory/galore_8bit_per_layer"]
    if not memory["skipped"]:  # the planner's figure for the same run, beside the measured one
        assert memory["metrics"]["planned_peak_bytes"] > 0 and "planned" in memory["measured"]
    if "bitsandbytes" not in (rows["galore_8bit/step"]["skipped"] or ""):
        assert rows["galore_8bit/step"]["metrics"]["uint8_states_on_device"] > 0
        calls = rows["galore_8bit/step"]["metrics"]["bnb_kernel_calls"]  # bitsandbytes' CPU kernels, by name
        assert calls.get("cquantize_blockwise_cpu_fp32", 0) > 0 and calls.get("cdequantize_blockwise_cpu_fp32", 0) > 0
    # The one table: every row on stdout, the targets marked dry, nothing else but its title and summary.
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check (DRY RUN on CPU") and lines[-1].endswith("exit 0")
    assert len(lines) == 3 + len(ROW_IDS) + 1
    assert "dry (MFU >= 45%)" in proc.stdout and "dry (>= 0.95x full)" in proc.stdout
    assert "dry (>= 1.05x full)" in proc.stdout and "dry (< 22 GB)" in proc.stdout


@pytest.mark.slow  # a process
def test_without_cuda_the_real_check_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The console script's module as a user runs it on a machine whose GPU is gone (CUDA_VISIBLE_DEVICES empty)."""
    out = tmp_path / "gpu_check.json"
    proc = _run_tool("--json", str(out), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"gpu_check: error: {NO_CUDA_LINE}"), proc.stderr
    assert not out.exists()


def _no_cuda(monkeypatch: pytest.MonkeyPatch, *, warning: str | None = None) -> None:
    """torch.cuda.is_available() answers False, as on a machine without a GPU (warning: as a CUDA build whose driver
    does not load, which warns while answering)."""

    def is_available() -> bool:
        if warning is not None:
            warnings.warn(warning, UserWarning, stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)


@pytest.mark.parametrize("warning", [None, "CUDA initialization: Found no NVIDIA driver on your system.\nPlease..."])
def test_without_cuda_the_tool_says_one_line_exits_2_and_writes_nothing(
    warning: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from megatron_pept.bench import gpu_check
    from megatron_pept.tools.gpu_check import main

    _no_cuda(monkeypatch, warning=warning)
    ran = []
    monkeypatch.setattr(gpu_check, "run_gpu_check", lambda settings: ran.append(settings))
    out = tmp_path / "gpu_check.json"
    assert main(["--json", str(out), "--only", "attention"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.splitlines() == [printed.err.rstrip("\n")], printed
    assert printed.err.startswith(f"gpu_check: error: {NO_CUDA_LINE}")
    if warning is not None:  # the driver's reason, on the same line
        assert printed.err.rstrip().endswith("(CUDA initialization: Found no NVIDIA driver on your system.)")
    assert not ran and not out.exists()
    # The dry run is the CPU mode: it runs without CUDA as before.
    fake = GpuCheckResult(settings=GpuCheckSettings.for_dry_run(), device="cpu", torch_version="x", rows=[], seconds=0)
    monkeypatch.setattr(gpu_check, "run_gpu_check", lambda settings: ran.append(settings) or fake)
    assert main(["--dry-run", "--json", str(out)]) == 0
    assert ran[0].dry_run and json.loads(out.read_text())["mode"] == "dry-run"


def test_the_library_refuses_a_real_check_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_pept.bench.gpu_check import run_gpu_check
    from megatron_pept.errors import UserError

    _no_cuda(monkeypatch)
    with pytest.raises(UserError, match="no CUDA device"):
        run_gpu_check(GpuCheckSettings(groups=("attention",)))


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


# -- optional packages: each one SKIPs only its own rows ------------------------------------------------------------


class _RaisingLoader:
    """Imports of the module fail as transformer-engine's PyTorch part does on a machine it cannot run on."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("transformer_engine.pytorch needs CUDA (a stand-in for its import failure)")


class _RaisingFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "transformer_engine.pytorch":
            return importlib.machinery.ModuleSpec(name, _RaisingLoader())
        return None


@pytest.fixture(params=["no-pytorch-module", "pytorch-raises"])
def te_without_pytorch(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """A top-level ``transformer_engine`` that imports (a transformer-engine install without its PyTorch part, or
    whose PyTorch part raises on import) while ``transformer_engine.pytorch`` does not; returns the error's name."""
    package = types.ModuleType("transformer_engine")
    package.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None, is_package=True)
    package.__path__ = []  # a package with no submodule files: only the finder below can provide one
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.delitem(sys.modules, "transformer_engine.pytorch", raising=False)
    if request.param == "pytorch-raises":
        monkeypatch.setattr(sys, "meta_path", [_RaisingFinder(), *sys.meta_path])
        return "RuntimeError"
    return "ModuleNotFoundError"


def test_transformer_engine_is_there_only_when_its_pytorch_module_imports(te_without_pytorch: str) -> None:
    from megatron_pept.bench.gpu_check.attention import ATTENTION_PACKAGES
    from megatron_pept.bench.gpu_check.harness import unavailable

    assert ATTENTION_PACKAGES["te"] == "transformer_engine.pytorch"
    import transformer_engine  # noqa: F401  (the top-level package imports)

    assert unavailable("transformer_engine") is None
    why = unavailable("transformer_engine.pytorch")
    assert why is not None and why.startswith(f"transformer_engine.pytorch does not import ({te_without_pytorch}")
    assert unavailable("torch") is None and unavailable("no_such_package_here") == "not installed"


def test_a_package_that_does_not_import_skips_only_its_own_rows(
    te_without_pytorch: str, monkeypatch: pytest.MonkeyPatch, quickstart_data: Path
) -> None:
    """transformer-engine without its PyTorch part and no bitsandbytes: the te row and the two bitsandbytes rows
    (memory, galore_8bit) are SKIPs saying why; the flash row (given an installed stand-in kernel here) is still
    measured. Before, the te row counted the top-level package as installed and FAILed on the missing module."""
    from megatron_pept.bench import gpu_check
    from megatron_pept.models import attention

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    monkeypatch.setitem(gpu_check.attention.ATTENTION_PACKAGES, "flash", "torch")  # an installed stand-in
    real = attention.build_core_attention

    def build(backend: str, **kwargs) -> torch.nn.Module:  # flash-attn stands in as sdpa; te is the real one
        return real("sdpa" if backend == "flash" else backend, **kwargs)

    monkeypatch.setattr(attention, "build_core_attention", build)
    for dry in (True, False):  # judged as on a GPU, or as the dry run
        settings = GpuCheckSettings.for_dry_run(
            dry_run=dry, threads=None, data=str(quickstart_data), groups=("memory", "galore_8bit", "attention")
        )
        result = gpu_check.run_gpu_check(settings, log=lambda message: None)
        rows = {r.id: r for r in result.rows}
        assert list(rows) == ["memory/galore_8bit_per_layer", "galore_8bit/step", "attention/flash", "attention/te"]
        assert rows["attention/flash"].status == (DRY if dry else PASS), rows["attention/flash"]
        assert rows["attention/flash"].metrics["logits_max_abs_diff"] == 0.0
        te = rows["attention/te"]
        assert te.status == SKIP and te.error is None and te.measured == "does not import", te
        assert te.skipped.startswith(f"transformer_engine.pytorch does not import ({te_without_pytorch}")
        for row_id in ("memory/galore_8bit_per_layer", "galore_8bit/step"):
            row = rows[row_id]
            assert row.status == SKIP and row.measured == "not installed" and "bitsandbytes" in row.skipped, row
        assert result.exit_code == 0


def test_bitsandbytes_kernel_calls_are_counted_and_the_library_restored() -> None:
    """The count the galore_8bit row judges: calls into bitsandbytes' compiled library for the tensor's device
    (its CPU kernels here, its CUDA kernels on a GPU), by name; nothing counted outside the block."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    import importlib

    from megatron_pept.bench.gpu_check.galore_8bit import blockwise_calls, bnb_native_calls

    ops = importlib.import_module("bitsandbytes.backends.cpu.ops")
    real = ops.lib
    code = bnbf.create_dynamic_map(signed=True)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    with bnb_native_calls(torch.device("cpu")) as calls:
        q, state = bnbf.quantize_blockwise(x, code=code, blocksize=256)
        back = bnbf.dequantize_blockwise(q, absmax=state.absmax, code=code, blocksize=256)
    assert calls == {"cquantize_blockwise_cpu_fp32": 1, "cdequantize_blockwise_cpu_fp32": 1}
    assert blockwise_calls(calls) == (1, 1) and ops.lib is real
    assert (back - x).abs().max() <= 0.02 * x.abs().max()  # it did quantise
    bnbf.quantize_blockwise(x, code=code, blocksize=256)
    assert sum(calls.values()) == 2
