"""The spike rules under data parallelism: a garbage batch on one rank only (the other's is fine) is judged on the
global loss and gradient norm, so both ranks skip the step, and the weights stay exactly those of the step before;
a run resumed on 2 ranks from a checkpoint before the spike judges it as the uninterrupted run did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base, shared_launch

# train.seed=2: the garbage step must be a spike by the rules. With the per-weight initialisation (issue 28) seed 0
# makes it a marginal one (one process, half the step's batch garbage: gradient norm 4.6 under a limit of 5.0, as a
# noisy step 5 widened the window); seeds 1 and 2 give 6.9 over 4.0 and 19.9 over 4.2.
SPIKE_RULES = ["guard.spike_loss_sigma=3", "guard.spike_grad_norm_ratio=3", "guard.spike_window=4", "train.seed=2"]
BACKENDS = ("ddp", "fsdp2")


@shared_launch("torchrun")
def spike_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    runs = []
    for backend in BACKENDS:
        # step 7's batch on rank 0 is garbage; the reference stops before it (a constant learning rate: the first 6
        # steps do not depend on the number of steps)
        common = [f"parallel.backend={backend}", "optim.schedule=constant", *SPIKE_RULES]
        runs.append(
            {
                "name": f"{backend}-garbage",
                "overrides": base(quickstart_data, tmp / f"{backend}-garbage", 2) + [*common, "train.steps=7"],
                "garbage": [7, 0],
            }
        )
        runs.append(
            {
                "name": f"{backend}-before",
                "overrides": base(quickstart_data, tmp / f"{backend}-before", 2) + [*common, "train.steps=6"],
            }
        )
    resume = base(quickstart_data, tmp / "fsdp2-resumed", 2) + ["parallel.backend=fsdp2", "optim.schedule=constant"]
    resume += [*SPIKE_RULES, "train.steps=7", "checkpoint.interval=100"]
    runs.append({"name": "fsdp2-cut", "overrides": resume, "stop_after": 5})
    runs.append({"name": "fsdp2-resumed", "overrides": resume, "garbage": [2, 0]})  # step 7 of the run
    return runs


@pytest.fixture(scope="module")
def results(spike_runs: tuple[dict, Path]) -> dict:
    return spike_runs[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rank_skips_a_spike_seen_on_one(backend: str, results: dict) -> None:
    garbage, before = results[f"{backend}-garbage"], results[f"{backend}-before"]
    assert garbage["losses"][:6] == before["losses"]
    assert garbage["guard"].tolist() == [[1, 1, 0], [1, 1, 0]]  # spikes, skipped, non-finite in a row: per rank
    for name, value in before["params"].items():
        assert torch.equal(garbage["params"][name], value), name
    if "replicas" in garbage:
        assert torch.equal(garbage["replicas"][0], garbage["replicas"][1])


def test_a_resumed_run_keeps_the_spike_statistics_on_two_ranks(results: dict) -> None:
    whole, resumed = results["fsdp2-garbage"], results["fsdp2-resumed"]
    assert resumed["losses"] == whole["losses"][5:]
    assert resumed["guard"].tolist() == [[1, 1, 0], [1, 1, 0]]
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name
