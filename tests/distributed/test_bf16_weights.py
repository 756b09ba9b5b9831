"""Weights held in bf16 (``train.param_dtype=bf16``) on DDP and FSDP2 with 2 gloo ranks (the session's torchrun
launch) against one process on the same global batch, for each ``optim.weight_update``, per-layer updates included.

The rounding is the same on every layout (stochastic rounding draws its bits by the weight's rows, not the rank's),
but the gradients are summed in bf16 in another order (one process accumulates two micro-batches, two ranks
all-reduce one each), so a step can differ in its last bf16 bit and then round to the other neighbour, which
changes the next gradients a little more: after 4 steps the losses agree to 2e-3 (measured: 4e-4) and each weight to
3% of its norm (measured: 1% with AdamW and Adam-mini, 2% with GaLore, whose projector follows the gradient's top
singular vectors). That the rounding itself does not depend on the layout is tested exactly in
tests/unit/test_weight_update.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base, resume_from, saving_at, shared_launch

from megatron_pept.registry import load_config
from megatron_pept.trainer import Trainer

CASES = {
    "full-stochastic": ["optim.weight_update=stochastic"],
    "full-kahan": ["optim.weight_update=kahan"],
    "full-nearest": ["optim.weight_update=nearest"],
    "galore-stochastic": ["method.name=galore", "optim.weight_update=stochastic"],
    # bf16 weights computed in fp32 (each module's weights upcast for its forward; FSDP2 gathers the bf16 shards)
    "full-stochastic-fp32_compute": ["optim.weight_update=stochastic", "train.dtype=fp32"],
    "adam_mini-per_layer-kahan": [
        "method.name=adam_mini",
        "optim.weight_update=kahan",
        "optim.per_layer=true",
        "train.max_grad_norm=0",
    ],
}


def overrides(data: Path, run_dir: Path, case: str) -> list[str]:
    return base(data, run_dir, 2) + ["train.param_dtype=bf16", *CASES[case]]


@shared_launch("torchrun")
def bf16_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    return [
        {
            "name": f"{backend}-{case}",
            "overrides": overrides(quickstart_data, tmp / f"{backend}-{case}", case) + [f"parallel.backend={backend}"],
        }
        for backend in ("ddp", "fsdp2")
        for case in CASES
    ]


@pytest.fixture(scope="module")
def bf16_results(bf16_runs: tuple[dict, Path]) -> dict:
    return bf16_runs[0]


_SINGLE: dict[str, tuple[list[float], dict[str, torch.Tensor]]] = {}


def single(data: Path, tmp: Path, case: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    if case not in _SINGLE:
        trainer = Trainer(load_config(None, overrides(data, tmp, case)))
        losses = trainer.train().train_losses
        _SINGLE[case] = (losses, {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()})
        trainer.close()
    return _SINGLE[case]


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_weights_on_two_ranks_match_one_process(case, backend, bf16_results, quickstart_data, tmp_path) -> None:
    losses, params = single(quickstart_data, tmp_path, case)
    two = bf16_results[f"{backend}-{case}"]
    assert two["losses"] == pytest.approx(losses, abs=2e-3)  # measured: at most 4e-4
    assert set(two["params"]) == set(params)
    for name, value in params.items():
        theirs = two["params"][name]
        assert theirs.dtype == value.dtype == torch.bfloat16, name  # no fp32 copy on any layout
        gap = float((theirs.float() - value.float()).norm() / value.float().norm())
        assert gap < 3e-2, (name, gap)  # measured: at most 2e-2 (GaLore: a near-tie in the gradient's spectrum)


# -- DeepSpeed ZeRO: its bf16 weights without an fp32 master (bf16.bf16_master_weights_and_grads) ---------------------

# Three layers and an odd MLP width, as in test_data_parallel.py: ZeRO's partition boundaries then fall inside
# matrices (stages 1/2) and inside rows (stage 3), so a weight's pieces on two ranks get their rounding bits apart.
ZERO_MODEL = ["model.num_layers=3", "model.intermediate_size=101"]
ZERO_CASES = {  # name -> (stage, case)
    "zero1-full-stochastic": (1, "full-stochastic"),
    "zero2-full-kahan": (2, "full-kahan"),
    "zero3-full-stochastic": (3, "full-stochastic"),
    "zero2-galore-stochastic": (2, "galore-stochastic"),
    "zero3-adam_mini-stochastic": (3, "adam_mini-stochastic"),
}
CASES["adam_mini-stochastic"] = ["method.name=adam_mini", "optim.weight_update=stochastic"]
ZERO_RESUMED = {"zero2-galore-stochastic", "zero3-full-stochastic"}  # also stopped after step 2 and resumed


def zero_overrides(data: Path, run_dir: Path, name: str) -> list[str]:
    stage, case = ZERO_CASES[name]
    return [
        *overrides(data, run_dir, case),
        *ZERO_MODEL,
        "parallel.backend=deepspeed",
        f"parallel.zero_stage={stage}",
        "checkpoint.interval=100",
    ]


@shared_launch("deepspeed")
def bf16_zero_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    runs = []
    for name in ZERO_CASES:
        whole = zero_overrides(quickstart_data, tmp / f"w-{name}", name)
        if name in ZERO_RESUMED:
            whole += saving_at(2)
        runs.append({"name": name, "overrides": whole})
        if name in ZERO_RESUMED:
            cut = zero_overrides(quickstart_data, tmp / f"c-{name}", name)
            runs.append({"name": f"resume-{name}", "overrides": [*cut, resume_from(tmp / f"w-{name}", 2)]})
    return runs


@pytest.mark.parametrize("name", list(ZERO_CASES))
def test_bf16_weights_under_deepspeed_zero_match_one_process(name, bf16_zero_runs, quickstart_data, tmp_path) -> None:
    """ZeRO hands the optimizer bf16 flat partitions (no fp32 master anywhere); each piece of a weight is rounded
    with the bits that weight gets on one process, so two ranks follow one process as DDP's and FSDP2's do."""
    _, case = ZERO_CASES[name]
    trainer = Trainer(load_config(None, [*overrides(quickstart_data, tmp_path, case), *ZERO_MODEL]))
    losses = trainer.train().train_losses
    params = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
    trainer.close()
    two = bf16_zero_runs[0][name]
    assert int(two["split"]) >= 1  # some weight is cut between the ranks' partitions
    assert two["master_dtypes"] == "torch.bfloat16"  # ZeRO's master partitions: bf16, no fp32 copy
    assert two["losses"] == pytest.approx(losses, abs=2e-3)
    assert set(two["params"]) == set(params)
    for n, value in params.items():
        theirs = two["params"][n]
        assert theirs.dtype == value.dtype == torch.bfloat16, n  # no fp32 copy
        gap = float((theirs.float() - value.float()).norm() / value.float().norm())
        assert gap < 3e-2, (n, gap)


@pytest.mark.parametrize("name", sorted(ZERO_RESUMED))
def test_bf16_weights_under_deepspeed_zero_resume_bit_identically(name, bf16_zero_runs) -> None:
    """DeepSpeed's checkpoint of the bf16 partitions and our optimizer's state (the rounding count, the Kahan
    buffer, GaLore's and Adam-mini's per-weight state): the resumed steps equal the uninterrupted ones exactly."""
    whole, resumed = bf16_zero_runs[0][name], bf16_zero_runs[0][f"resume-{name}"]
    assert resumed["losses"] == whole["losses"][2:]
    for n, value in whole["params"].items():
        assert torch.equal(resumed["params"][n], value), n
