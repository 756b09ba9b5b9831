"""Every ReLoRA-family method trains the debug and 60m shapes through the public CLI, and logs under relora/."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import run_all, small_run, train_command

VARIANTS = ["lora", "relora", "redora", "repissa", "reloqra"]
LARGE = ["repissa", "reloqra"]  # the two whose init decomposes each 60m matrix


def command(run_dir: Path, data: Path, *overrides: str) -> list[str]:
    base = small_run(data, run_dir, "metrics.tensorboard=true", "train.global_batch_size=4", "train.eval_batches=1")
    return train_command(*base, "method.rank=8", *overrides)


@pytest.fixture(scope="module")
def runs(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every variant on the debug shape with restarts, and LARGE on 60m: (the finished process, its run_dir) by
    name (``debug-METHOD``, ``60m-METHOD``); two at a time."""
    tmp, cmds = tmp_path_factory.mktemp("lowrank-cli"), {}
    for method in VARIANTS:
        restarts = ["train.steps=7", "method.reset_every=3", "method.warm_start_steps=2"]
        restarts += ["method.restart_warmup_steps=1", "train.eval_interval=7"]
        cmds[f"debug-{method}"] = command(tmp / f"debug-{method}", quickstart_data, f"method.name={method}", *restarts)
    for method in LARGE:
        large = ["model.name=60m", "train.steps=2", "method.reset_every=1", "train.eval_interval=0"]
        large += ["metrics.tensorboard=false"]
        cmds[f"60m-{method}"] = command(tmp / f"60m-{method}", quickstart_data, f"method.name={method}", *large)
    return {name: (proc, tmp / name) for name, proc in zip(cmds, run_all(list(cmds.values())))}


@pytest.mark.parametrize("method", VARIANTS)
def test_variant_trains_debug_with_restarts(method: str, runs: dict[str, tuple]) -> None:
    proc, run_dir = runs[f"debug-{method}"]
    assert proc.returncode == 0, proc.stderr
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"relora/restarts", "relora/phase", "relora/adapter_norm", "train/loss", "val/loss"} <= tags
    restarts = [e.value for e in acc.Scalars("relora/restarts")]
    assert restarts[-1] == (0 if method == "lora" else 1)  # switch at 2, restart at 5 (not at 8 > steps)
    assert [e.value for e in acc.Scalars("relora/phase")][:2] == [0.0, 1.0]
    if method != "lora":
        assert {"relora/pruned_fraction", "relora/merged_update_norm"} <= tags
        assert acc.Scalars("relora/pruned_fraction")[0].value == pytest.approx(0.99, abs=0.005)
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[3] == 0.0  # step index 2 (logged as 3) is the first low-rank step: the jagged schedule restarts at 0


@pytest.mark.parametrize("method", LARGE)
def test_variant_trains_60m(method: str, runs: dict[str, tuple]) -> None:
    proc, _ = runs[f"60m-{method}"]
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stdout and f"method {method}" in proc.stdout
