"""The GPU acceptance check (``megatron-pept-gpu-check``, tools/gpu_check.py) for real, on a CUDA device: it runs
once for the module (sized to take under 8 minutes on an H100/H200); then one test per row, so the table's verdicts
are the suite's: a measured row meets its target, a row whose package is not installed or whose target does not
apply to this GPU is a skip saying so, and the exit status is 1 exactly when a row FAILs. A row whose target the
stack cannot meet yet is an expected failure with the reason. Skipped without CUDA."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from gpu_support import HAS_CUDA, requires_gpu

from launch import run

pytestmark = [pytest.mark.gpu, requires_gpu]

ROW_IDS = [
    "memory/galore_8bit_per_layer",
    "galore_8bit/step",
    "attention/flash",
    "attention/te",
    *(f"throughput/{m}/{b}" for b in ("single", "fsdp2") for m in ("full", "galore", "relora")),
]
NOT_YET = {
    "memory/galore_8bit_per_layer": "planned at 21.6 GiB with bf16 weights, 2% under the 22 GiB target: the caching "
    "allocator's rounding may cross it (docs/benchmarks.md, Memory planner)",
}
"""Rows whose target the stack cannot meet yet, with the reason (expected failures, not strict: a pass shows)."""


@pytest.fixture(scope="module")
def check(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The check's process and its JSON record (on the CPU run of the bodies: the dry run)."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    mode = [] if HAS_CUDA else ["--dry-run"]
    cmd = [
        sys.executable,
        "-m",
        "megatron_pept.tools.gpu_check",
        *mode,
        "--json",
        str(out),
        "--data",
        str(quickstart_data),
    ]
    proc = run(cmd, timeout=1500)
    print(proc.stdout)  # the table, in the test log whatever the outcome
    assert out.is_file(), f"no record (exit {proc.returncode}): {proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_the_check_reports_every_row_and_exits_1_exactly_when_one_fails(check: tuple) -> None:
    proc, record = check
    assert record["mode"] == ("real" if HAS_CUDA else "dry-run")
    assert [r["id"] for r in record["rows"]] == ROW_IDS
    failed = any(r["status"] == "FAIL" for r in record["rows"])
    assert proc.returncode == record["exit_code"] == (1 if failed else 0), proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 + len(ROW_IDS) + 1 and lines[-1].endswith(f"exit {proc.returncode}"), proc.stdout


@pytest.mark.parametrize(
    "row_id",
    [pytest.param(r, marks=pytest.mark.xfail(reason=NOT_YET[r], strict=False)) if r in NOT_YET else r for r in ROW_IDS],
)
def test_the_row_meets_its_target(row_id: str, check: tuple) -> None:
    row = {r["id"]: r for r in check[1]["rows"]}[row_id]
    assert row["error"] is None, f"{row['check']}: {row['error']}"
    if row["status"] == "SKIP":
        # Only an optional package that does not import, or a target that does not apply to this GPU (the MFU
        # target on a GPU other than an H100/H200), skips a row.
        assert row["skipped"] or not row["judged"], row
        pytest.skip(f"{row['check']}: {row['skipped'] or row['note']}")
    assert row["checks"] and all(math.isfinite(c["value"]) for c in row["checks"]), row
    expected = "PASS" if HAS_CUDA else "dry"
    missed = [f"{c['text']} (measured {c['value']:.4g})" for c in row["checks"] if not c["met"]]
    assert row["status"] == expected, (
        f"{row['check']} ({row['backend']}): {row['measured']}; missed {missed}; {row['note']}"
    )
