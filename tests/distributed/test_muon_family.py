"""Muon, NorMuon and Dion with 2 gloo ranks against one process on the same global batch (losses and final weights
within test_data_parallel's tolerances): every method on FSDP2 and ZeRO-2, Muon also on DDP (whole gradients: the
one-process path), ZeRO-1 and ZeRO-3, Dion on ZeRO-3 (its row-shard arithmetic on fragments cut inside rows), and
per-layer updates on DDP. Under FSDP2 and ZeRO each Muon matrix is orthogonalised on one owner rank and broadcast
back; Dion's power iteration runs on every rank's rows. Checkpoints: FSDP2 and ZeRO runs interrupted and resumed end
bit-identical to uninterrupted ones, and a 2-rank FSDP2 checkpoint resumes on one process (momentum by rows;
NorMuon's row moments, Dion's right factor and seed whole)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LOSS_TOL, WEIGHT_TOL, assert_bit_identical, base, resume_from, resume_runs, shared_launch
from test_data_parallel import DEEPSPEED_MODEL, compare, single

from megatron_pept.config import load_config
from megatron_pept.trainer import Trainer

# Newton-Schulz in fp32 for the comparisons with one process: in bf16 (the default) the rounding-level differences
# of a sharded gradient (a different summation order) become differences of a bf16 unit in the orthogonalised update,
# up to 5e-4 in the weights after 4 steps here; in fp32 they stay near 1e-7, which shows the owner scheme itself
# exact. The bf16 default is compared too (fsdp2-muon@bf16, within 2e-3) and resumes bit for bit (the resume runs).
# Adam's eps 1e-6, as test_apollo_family's: with 1e-8 the AdamW embedding's near-zero gradients amplify differences.
EPS = ["optim.eps=1e-6"]
NS32 = ["method.ns_dtype=fp32"]
METHODS = {
    "muon": [*EPS, *NS32],
    "normuon": [*EPS, *NS32],
    "dion": [*EPS, "method.rank_fraction=0.25"],
    "muon@bf16": EPS,
}
RESUMED = ("muon@bf16", "normuon", "dion")
STEPS, STOP = 8, 5
ZERO = ["parallel.backend=deepspeed", *DEEPSPEED_MODEL]
PER_LAYER = ["optim.per_layer=true", "train.max_grad_norm=0"]


def method_overrides(data: Path, run_dir: Path, method: str, *extra: str) -> list[str]:
    return [*base(data, run_dir, 2), f"method.name={method.split('@')[0]}", *METHODS[method], *extra]


def resume_overrides(data: Path, run_dir: Path, method: str, *backend: str) -> list[str]:
    return method_overrides(
        data, run_dir, method, *backend, f"train.steps={STEPS}", "checkpoint.interval=100", "data.allow_reshard=true"
    )


TORCHRUN_CASES = [("ddp", "muon"), *(("fsdp2", m) for m in METHODS)]

PER_LAYER_CASES = ["muon", "dion"]  # on DDP


@shared_launch("torchrun")
def torchrun_runs(data: Path, tmp: Path) -> list[dict]:
    runs = [
        {
            "name": f"{backend}-{method}",
            "overrides": method_overrides(data, tmp / f"{backend}-{method}", method, f"parallel.backend={backend}"),
        }
        for backend, method in TORCHRUN_CASES
    ]
    for method in PER_LAYER_CASES:
        runs.append(
            {
                "name": f"ddp-per_layer-{method}",
                "overrides": method_overrides(data, tmp / f"pl-{method}", method, "parallel.backend=ddp", *PER_LAYER),
            }
        )
    runs.append(  # Dion's all-reduces inside the backward hooks, in the same order on both ranks
        {
            "name": "fsdp2-per_layer-dion",
            "overrides": method_overrides(data, tmp / "fsdp2-pl-dion", "dion", "parallel.backend=fsdp2", *PER_LAYER),
        }
    )
    for method in RESUMED:
        runs += resume_runs(
            f"fsdp2-{method}",
            tmp,
            lambda run_dir, m=method: resume_overrides(data, run_dir, m, "parallel.backend=fsdp2"),
            stop=STOP,
        )
    return runs


ZERO_CASES = [("muon", 1), ("muon", 2), ("normuon", 2), ("dion", 2), ("muon", 3), ("dion", 3)]
ZERO_RESUME_CASES = [("muon@bf16", 2), ("normuon", 3), ("dion", 2)]


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
    run = torchrun_runs[0][f"{backend}-{method}"]
    if method.endswith("@bf16"):  # bf16 Newton-Schulz: the same losses; weights within 1% of their norm (above)
        assert run["losses"] == pytest.approx(losses, abs=LOSS_TOL)
        for name, value in params.items():
            assert float((run["params"][name] - value).norm() / value.norm()) < 1e-2, name
        return
    compare(run, losses, params, weight_tol=WEIGHT_TOL)


@pytest.mark.parametrize("method", PER_LAYER_CASES)
def test_per_layer_under_ddp_matches_one_process(method: str, torchrun_runs, quickstart_data, tmp_path) -> None:
    """Each matrix stepped in its backward hook once DDP's all-reduce of its gradient is done."""
    losses, params = single(method_overrides(quickstart_data, tmp_path, method, *PER_LAYER))
    compare(torchrun_runs[0][f"ddp-per_layer-{method}"], losses, params, weight_tol=WEIGHT_TOL)


def test_dion_per_layer_under_fsdp2_matches_one_process(torchrun_runs, quickstart_data, tmp_path) -> None:
    """Dion needs no owner: each row shard's power iteration runs in its backward hook, its all-reduces in the same
    order on both ranks (Muon and NorMuon refuse per-layer updates under FSDP2, test_muon.py)."""
    losses, params = single(method_overrides(quickstart_data, tmp_path, "dion", *PER_LAYER))
    compare(torchrun_runs[0]["fsdp2-per_layer-dion"], losses, params, weight_tol=WEIGHT_TOL)


@pytest.mark.parametrize("method,stage", ZERO_CASES)
def test_deepspeed_zero_matches_one_process(method: str, stage: int, zero_runs, quickstart_data, tmp_path) -> None:
    losses, params = single(method_overrides(quickstart_data, tmp_path, method, *DEEPSPEED_MODEL))
    run = zero_runs[f"zero{stage}-{method}"]
    compare(run, losses, params, weight_tol=WEIGHT_TOL)
    assert int(run["split"]) >= 1  # some matrix is cut between the ranks


@pytest.mark.parametrize("method", RESUMED)
def test_fsdp2_resume_is_bit_identical(method: str, torchrun_runs) -> None:
    results, _ = torchrun_runs
    assert_bit_identical(results[f"whole-fsdp2-{method}"], results[f"resume-fsdp2-{method}"], stop=STOP)


@pytest.mark.parametrize("method,stage", ZERO_RESUME_CASES)
def test_deepspeed_resume_is_bit_identical(method: str, stage: int, zero_runs) -> None:
    assert_bit_identical(zero_runs[f"whole-zero{stage}-{method}"], zero_runs[f"resume-zero{stage}-{method}"], stop=STOP)


@pytest.mark.parametrize("method", RESUMED)
def test_fsdp2_checkpoint_resumes_on_one_process(
    method: str, torchrun_runs, quickstart_data: Path, tmp_path: Path
) -> None:
    """Saved by 2 FSDP2 ranks after step 5, resumed by one process: it trains on like the 2-rank run."""
    results, tmp = torchrun_runs
    saved = resume_from(tmp / f"whole-fsdp2-{method}", STOP)
    trainer = Trainer(
        load_config(None, [*resume_overrides(quickstart_data, tmp_path, method, "parallel.backend=single"), saved])
    )
    assert trainer.resumed_from is not None and trainer.state.step == STOP
    states = [trainer.optimizer.state[p] for p in trainer.raw_model.parameters() if p.ndim == 2]
    momentum = [s["momentum_buffer"] for s in states if "momentum_buffer" in s]
    assert len(momentum) == 14 and all(m.abs().sum() > 0 for m in momentum)  # whole again, from both ranks' rows
    if method == "dion":
        assert all(
            s["dion_q"].shape[1] == max(1, round(0.25 * min(s["momentum_buffer"].shape)))
            for s in states
            if "dion_q" in s
        )
    result = trainer.train()
    whole = results[f"whole-fsdp2-{method}"]
    assert result.train_losses == pytest.approx(whole["losses"][STOP:], abs=LOSS_TOL)
    params = dict(trainer.raw_model.named_parameters())
    assert params.keys() == whole["params"].keys()
    for name, value in whole["params"].items():
        assert torch.allclose(params[name].detach(), value, atol=WEIGHT_TOL), name
    trainer.close()
