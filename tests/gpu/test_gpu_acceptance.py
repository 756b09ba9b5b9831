"""The GPU acceptance check (tools/gpu_check.py) for real, on a CUDA device: every row is measured, or skipped
because an optional package is not installed or a target does not apply to this GPU, and every target is met
(exit status 0). Skipped without CUDA; sized to take under 8 minutes on an H100/H200."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[2]
ROW_IDS = [
    "memory/galore_8bit_per_layer",
    "galore_8bit/step",
    "attention/flash",
    "attention/te",
    *(f"throughput/{m}/{b}" for b in ("single", "fsdp2") for m in ("full", "galore", "relora")),
]


def test_the_gpu_acceptance_check_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)  # the table, in the test log whatever the outcome
    record = json.loads(out.read_text())
    assert record["mode"] == "real"
    rows = {r["id"]: r for r in record["rows"]}
    assert list(rows) == ROW_IDS
    for row in rows.values():
        assert row["error"] is None, row
        if row["status"] == "SKIP":
            assert "not installed" in (row["skipped"] or "") or not row["judged"], row
            continue
        assert all(math.isfinite(c["value"]) for c in row["checks"]), row
    failed = [
        f"{r['check']} ({r['backend']}): {r['measured']} vs {r['target']}"
        for r in rows.values()
        if r["status"] == "FAIL"
    ]
    assert proc.returncode == 0 and not failed, "\n".join(failed) + "\n" + proc.stdout + proc.stderr[-4000:]
