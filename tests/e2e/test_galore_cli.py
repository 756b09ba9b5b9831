"""Every GaLore-family method and Adam-mini trains through the public CLI and logs under galore/."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import run, small_run, train_command


@pytest.mark.parametrize(
    "method,extra",
    [
        ("galore", ["method.svd=randomized"]),
        ("galore_ef", []),
        ("galore_dynamic", []),
        ("galore_dynamic_ef", ["optim.per_layer=true"]),
        ("galore_8bit", []),
        ("galore_adafactor", []),
        ("adam_mini", ["optim.per_layer=true"]),
    ],
)
def test_method_trains_and_logs(method: str, extra: list[str], quickstart_data: Path, tmp_path: Path) -> None:
    galore = ["method.rank=8", "method.update_proj_gap=2", "method.dynamic_first=2", "method.dynamic_cap=3"]
    overrides = small_run(quickstart_data, tmp_path, "metrics.tensorboard=true", "train.eval_batches=1")
    overrides += ["train.steps=6", "train.eval_interval=6", f"method.name={method}", *galore, *extra]
    proc = run(train_command(*overrides))
    assert proc.returncode == 0, proc.stderr
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/grad_norm"} <= tags
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))  # a real norm, also with per-layer updates
    if method == "adam_mini":
        return
    refreshes = [e.value for e in acc.Scalars("galore/refreshes")]
    per_refresh = 14  # projected matrices of the debug model (2 layers x 7)
    if method.startswith("galore_dynamic"):
        assert refreshes[-1] == 4 * per_refresh  # steps 0, 2, 3, 4 (2 x 1.5 = 3, 3 x 1.5 = 4.5; gaps <= 3)
    else:
        assert refreshes[-1] == 3 * per_refresh  # steps 0, 2, 4
    assert "galore/svd_seconds" in tags and "galore/subspace_overlap" in tags
    overlap = acc.Scalars("galore/subspace_overlap")[0].value
    assert 0.0 < overlap <= 1.0 + 1e-6
    if method.endswith("_ef"):
        assert acc.Scalars("galore/ef_residual_norm")[-1].value > 0
