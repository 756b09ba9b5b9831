"""APOLLO, APOLLO-Mini and Fira with 2 gloo ranks against one process on the same global batch (losses and final
weights within test_data_parallel's tolerances): every method on FSDP2 and ZeRO-2, APOLLO-Mini also on DDP, ZeRO-1
and ZeRO-3 (DDP hands the optimizer whole gradients, the one-process path; ZeRO-1/3 the same flat partitions as
ZeRO-2). Their checkpoints: FSDP2 and ZeRO runs (ZeRO: each method on one stage, APOLLO and Fira on stage 3 there)
interrupted and resumed end bit-identical to uninterrupted ones, and a 2-rank FSDP2 checkpoint resumes on one
process (moments by rows, limiter norm, seeds and refresh counts resharded; APOLLO's projections redrawn from them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LOSS_TOL, WEIGHT_TOL, assert_bit_identical, base, resume_from, resume_runs, shared_launch
from test_data_parallel import DEEPSPEED_MODEL, compare, single

from megatron_pept.config import load_config
from megatron_pept.trainer import Trainer

# base(): rank 8 (APOLLO-Mini: 1), refresh every 2 steps. Adam's eps 1e-6, the three recipes' (configs/*_60m.yaml):
# with the default 1e-8 the first Adam steps of the plain AdamW embedding move an entry whose gradient is near zero
# by about lr * sign(g), so rounding-level differences between layouts reached 1.2e-4 there (Fira on FSDP2, all
# projected matrices within 4e-6); with 1e-6 the embedding agrees to 3e-6.
EPS = ["optim.eps=1e-6"]
METHODS = {"apollo": EPS, "apollo_mini": EPS, "fira": EPS}
STEPS, STOP = 8, 5  # resume runs: refreshes at 0, 2, 4, 6; interrupted after step 5 (mid-gap)
ZERO = ["parallel.backend=deepspeed", *DEEPSPEED_MODEL]
PER_LAYER = ["optim.per_layer=true", "train.max_grad_norm=0"]


def method_overrides(data: Path, run_dir: Path, method: str, *extra: str) -> list[str]:
    return [*base(data, run_dir, 2), f"method.name={method}", *METHODS[method], *extra]


def resume_overrides(data: Path, run_dir: Path, method: str, *backend: str) -> list[str]:
    return method_overrides(
        data, run_dir, method, *backend, f"train.steps={STEPS}", "checkpoint.interval=100", "data.allow_reshard=true"
    )


# DDP hands every method whole gradients (the one-process path, all-reduced first): one method on DDP, all on FSDP2.
TORCHRUN_CASES = [("ddp", "apollo_mini"), *(("fsdp2", m) for m in METHODS)]


@shared_launch("torchrun")
def torchrun_runs(data: Path, tmp: Path) -> list[dict]:
    runs = [
        {"name": f"{backend}-{method}", "overrides": method_overrides(data, tmp / f"{backend}-{method}", method, b)}
        for backend, b in (("ddp", "parallel.backend=ddp"), ("fsdp2", "parallel.backend=fsdp2"))
        for method in METHODS
        if (backend, method) in TORCHRUN_CASES
    ]
    runs.append(
        {
            "name": "fsdp2-per_layer-apollo_mini",
            "overrides": method_overrides(data, tmp / "pl", "apollo_mini", "parallel.backend=fsdp2", *PER_LAYER),
        }
    )
    for method in METHODS:
        runs += resume_runs(
            f"fsdp2-{method}",
            tmp,
            lambda run_dir, m=method: resume_overrides(data, run_dir, m, "parallel.backend=fsdp2"),
            stop=STOP,
        )
    return runs


# ZeRO-1 hands the optimizer the same flat partitions as ZeRO-2 (which also partitions the gradients before the
# optimizer sees them), and ZeRO-3 the same again over partitioned weights: every method on stage 2, APOLLO-Mini on
# all three (APOLLO and Fira reach stage 3 in their resume runs below).
ZERO_CASES = [(m, s) for s in (1, 2, 3) for m in METHODS if s == 2 or m == "apollo_mini"]
# Resume under ZeRO: each method once, the stages alternating (both keep the optimizer's state in the same flat
# partitions; what differs per method is the state: APOLLO's seeds and refresh counts, APOLLO-Mini's tensor-wise
# factor, Fira's limiter norm and SVD projector).
ZERO_RESUME_CASES = [("apollo", 2), ("apollo_mini", 3), ("fira", 3)]


@shared_launch("deepspeed")
def zero_launch(data: Path, tmp: Path) -> list[dict]:
    runs = [
        {
            "name": f"zero{stage}-{method}",
            "overrides": method_overrides(
                data, tmp / f"z{stage}-{method}", method, *ZERO, f"parallel.zero_stage={stage}"
            ),
        }
        for method, stage in ZERO_CASES
    ]
    for method, stage in ZERO_RESUME_CASES:
        runs += resume_runs(
            f"zero{stage}-{method}",
            tmp,
            lambda run_dir, m=method, s=stage: resume_overrides(data, run_dir, m, *ZERO, f"parallel.zero_stage={s}"),
            stop=STOP,
        )
    return runs


@pytest.fixture(scope="module")
def zero_runs(zero_launch: tuple[dict, Path]) -> dict:
    return zero_launch[0]


@pytest.mark.parametrize("backend,method", TORCHRUN_CASES)
def test_two_ranks_match_one_process(method: str, backend: str, torchrun_runs, quickstart_data, tmp_path) -> None:
    losses, params = single(method_overrides(quickstart_data, tmp_path, method))
    compare(torchrun_runs[0][f"{backend}-{method}"], losses, params, weight_tol=WEIGHT_TOL)


def test_per_layer_under_fsdp2_matches_one_process(torchrun_runs, quickstart_data, tmp_path) -> None:
    """Each row shard stepped in its backward hook: the per-tensor factor's and the limiter's all-reduces run
    inside backward, in the same order on both ranks."""
    losses, params = single(method_overrides(quickstart_data, tmp_path, "apollo_mini", *PER_LAYER))
    compare(torchrun_runs[0]["fsdp2-per_layer-apollo_mini"], losses, params, weight_tol=WEIGHT_TOL)


@pytest.mark.parametrize("method,stage", ZERO_CASES)
def test_deepspeed_zero_matches_one_process(method: str, stage: int, zero_runs, quickstart_data, tmp_path) -> None:
    losses, params = single(method_overrides(quickstart_data, tmp_path, method, *DEEPSPEED_MODEL))
    run = zero_runs[f"zero{stage}-{method}"]
    compare(run, losses, params, weight_tol=WEIGHT_TOL)
    assert int(run["split"]) >= 1  # some matrix is cut between the ranks
    assert int(run["midrow"]) >= 1  # a right-projected matrix is cut inside a row


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_resume_is_bit_identical(method: str, torchrun_runs) -> None:
    results, _ = torchrun_runs
    assert_bit_identical(results[f"whole-fsdp2-{method}"], results[f"resume-fsdp2-{method}"], stop=STOP)


@pytest.mark.parametrize("method,stage", ZERO_RESUME_CASES)
def test_deepspeed_resume_is_bit_identical(method: str, stage: int, zero_runs) -> None:
    assert_bit_identical(zero_runs[f"whole-zero{stage}-{method}"], zero_runs[f"resume-zero{stage}-{method}"], stop=STOP)


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_checkpoint_resumes_on_one_process(
    method: str, torchrun_runs, quickstart_data: Path, tmp_path: Path
) -> None:
    """Saved by 2 FSDP2 ranks after step 5, resumed by one process: it trains on like the 2-rank run."""
    results, tmp = torchrun_runs
    saved = resume_from(tmp / f"whole-fsdp2-{method}", STOP)  # the 2-rank run's checkpoint after step STOP
    trainer = Trainer(
        load_config(None, [*resume_overrides(quickstart_data, tmp_path, method, "parallel.backend=single"), saved])
    )
    assert trainer.resumed_from is not None and trainer.state.step == STOP
    state = next(
        trainer.optimizer.state[p]
        for p in trainer.raw_model.parameters()
        if "limiter_norm" in trainer.optimizer.state.get(p, {})
    )
    assert int(state["refreshes"]) == 3 and float(state["limiter_norm"]) > 0  # refreshes at 0, 2, 4
    result = trainer.train()
    whole = results[f"whole-fsdp2-{method}"]
    assert result.train_losses == pytest.approx(whole["losses"][STOP:], abs=LOSS_TOL)
    params = dict(trainer.raw_model.named_parameters())
    assert params.keys() == whole["params"].keys()
    for name, value in whole["params"].items():
        assert torch.allclose(params[name].detach(), value, atol=WEIGHT_TOL), name
    trainer.close()
