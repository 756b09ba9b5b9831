"""Checkpoints under FSDP2 with 2 gloo ranks: an interrupted run resumed on 2 ranks ends bit-identical to an
uninterrupted one; the same checkpoint resumed on 1 process (resharded model, optimizer and GaLore state) trains
on like the 2-rank run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LOSS_TOL, WEIGHT_TOL, base, launch, quantised_bases

from megatron_pept.config import load_config
from megatron_pept.trainer import Trainer

METHODS = {
    "full": [],
    "relora": ["method.reset_every=3"],
    "galore_dynamic_ef": ["method.dynamic_first=2", "method.dynamic_cap=3"],
    "relora@nf4": ["method.reset_every=3", "method.base_dtype=nf4"],  # sharded quantised parts and master
}
STEPS, STOP = 8, 5


def overrides(data: Path, run_dir: Path, method: str) -> list[str]:
    return base(data, run_dir, 2) + [
        f"train.steps={STEPS}",
        "parallel.backend=fsdp2",
        f"method.name={method.split('@')[0]}",
        "checkpoint.interval=100",
        "data.allow_reshard=true",
        *METHODS[method],
    ]


# Resume across ReLoRA's warm-start switch (DDP re-wraps the model for the new trainable set) and with per-layer
# updates, on DDP and FSDP2: (backend, overrides, steps before the interruption).
WARM = ["method.name=relora", "method.warm_start_steps=3", "method.reset_every=3"]
PER_LAYER = ["optim.per_layer=true", "train.max_grad_norm=0"]
MORE = {
    "ddp-relora-warm": ("ddp", WARM, 2),
    "fsdp2-relora-warm": ("fsdp2", WARM, 2),
    "ddp-per-layer-galore": ("ddp", [*PER_LAYER, "method.name=galore_dynamic_ef", "method.dynamic_first=2"], 5),
    "fsdp2-per-layer-adam_mini": ("fsdp2", [*PER_LAYER, "method.name=adam_mini"], 5),
}


@pytest.fixture(scope="module")
def fsdp2_runs(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("ckpt")
    runs = []
    for method in METHODS:
        runs.append(
            {"name": f"whole-{method}", "overrides": overrides(quickstart_data, tmp / f"whole-{method}", method)}
        )
        cut = overrides(quickstart_data, tmp / f"cut-{method}", method)
        runs.append({"name": f"stop-{method}", "overrides": cut, "stop_after": STOP})
        runs.append({"name": f"resume-{method}", "overrides": cut})
    for name, (backend, extra, stop) in MORE.items():
        common = [f"parallel.backend={backend}", *extra]
        runs.append(
            {"name": f"whole-{name}", "overrides": [*overrides(quickstart_data, tmp / f"w-{name}", "full"), *common]}
        )
        cut = [*overrides(quickstart_data, tmp / f"c-{name}", "full"), *common]
        runs.append({"name": f"stop-{name}", "overrides": cut, "stop_after": stop})
        runs.append({"name": f"resume-{name}", "overrides": cut})
    cut = [*overrides(quickstart_data, tmp / "cut-async", "galore_dynamic_ef"), "checkpoint.async_save=true"]
    runs.append({"name": "stop-async", "overrides": cut, "stop_after": STOP})
    runs.append({"name": "resume-async", "overrides": cut})
    for method in METHODS:  # checkpoints for the resharding test: 2 ranks save at STOP, 1 process resumes
        runs.append(
            {
                "name": f"reshard-{method}",
                "overrides": overrides(quickstart_data, tmp / f"reshard-{method}", method),
                "stop_after": STOP,
            }
        )
    return launch(runs, tmp), tmp


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_resume_is_bit_identical(method: str, fsdp2_runs) -> None:
    results, _ = fsdp2_runs
    whole, resumed = results[f"whole-{method}"], results[f"resume-{method}"]
    assert resumed["losses"] == whole["losses"][STOP:]
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name


@pytest.mark.parametrize("name", list(MORE))
def test_warm_start_and_per_layer_resume_bit_identical(name: str, fsdp2_runs) -> None:
    results, _ = fsdp2_runs
    whole, resumed = results[f"whole-{name}"], results[f"resume-{name}"]
    assert resumed["losses"] == whole["losses"][MORE[name][2] :]
    for key, value in whole["params"].items():
        assert torch.equal(resumed["params"][key], value), key


def test_fsdp2_asynchronous_save_resumes_bit_identical(fsdp2_runs) -> None:
    results, tmp = fsdp2_runs
    whole, resumed = results["whole-galore_dynamic_ef"], results["resume-async"]
    assert resumed["losses"] == whole["losses"][STOP:]
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    assert [f.name for f in sorted((tmp / "cut-async" / "checkpoints").glob("step_*"))] == [
        "step_00000005",
        "step_00000008",
    ]


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_checkpoint_resumes_on_one_process(method: str, fsdp2_runs, quickstart_data: Path) -> None:
    results, tmp = fsdp2_runs
    run_dir = tmp / f"reshard-{method}"
    cfg = load_config(None, [*overrides(quickstart_data, run_dir, method), "parallel.backend=single"])
    trainer = Trainer(cfg)
    assert trainer.resumed_from is not None and trainer.state.step == STOP
    result = trainer.train()
    whole = results[f"whole-{method}"]
    assert result.train_losses == pytest.approx(whole["losses"][STOP:], abs=LOSS_TOL)
    params = {**dict(trainer.raw_model.named_parameters()), **quantised_bases(trainer.raw_model)}
    assert params.keys() == whole["params"].keys()
    for name, value in whole["params"].items():
        if name.endswith(".dequantized_base"):  # a master equal to ~1e-7 may round a weight to the next code
            assert float((params[name] - value).norm() / value.norm()) < 1e-3, name
        else:
            assert torch.allclose(params[name].detach(), value, atol=WEIGHT_TOL), name


def test_fsdp2_checkpoint_exports_to_hf(fsdp2_runs, quickstart_data: Path) -> None:
    """The 2-rank FSDP2 ReLoRA checkpoint, exported: transformers' logits equal our model loaded from it."""
    transformers = pytest.importorskip("transformers")
    from megatron_pept.checkpoint.hf_export import export_to_hf

    _, tmp = fsdp2_runs
    run_dir = tmp / "whole-relora"
    out = export_to_hf(run_dir, tmp / "hf-relora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = Trainer(load_config(None, [*overrides(quickstart_data, run_dir, "relora"), "parallel.backend=single"]))
    assert ours.state.step == STEPS
    ids = torch.randint(0, ours.model_args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.raw_model.eval()(ids), atol=1e-5, rtol=1e-5)


ZERO_METHODS = {**METHODS, "adam_mini": []}
ZERO_CASES = [(m, stage) for stage in (2, 3) for m in ZERO_METHODS if not (stage == 3 and "@nf4" in m)]  # refused


def zero_overrides(data: Path, run_dir: Path, method: str, stage: int) -> list[str]:
    return base(data, run_dir, 2) + [
        f"train.steps={STEPS}",
        "parallel.backend=deepspeed",
        f"parallel.zero_stage={stage}",
        "model.num_layers=3",  # partitions cut matrices mid-row
        f"method.name={method.split('@')[0]}",
        "checkpoint.interval=100",
        *ZERO_METHODS[method],
    ]


@pytest.fixture(scope="module")
def zero_runs(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("zero-ckpt")
    runs = []
    for method, stage in ZERO_CASES:
        name = f"z{stage}-{method}"
        runs.append(
            {
                "name": f"whole-{name}",
                "overrides": zero_overrides(quickstart_data, tmp / f"w-{name}", method, stage),
            }
        )
        cut = zero_overrides(quickstart_data, tmp / f"c-{name}", method, stage)
        runs.append({"name": f"stop-{name}", "overrides": cut, "stop_after": STOP})
        runs.append({"name": f"resume-{name}", "overrides": cut})
    return launch(runs, tmp, launcher="deepspeed")


@pytest.mark.parametrize("method,stage", ZERO_CASES)
def test_deepspeed_resume_is_bit_identical(method: str, stage: int, zero_runs) -> None:
    """DeepSpeed's own checkpoint (loaded without executing pickled code) plus our state: the GaLore and Adam-mini
    fragments' state, the method, the loader and RNG."""
    whole, resumed = zero_runs[f"whole-z{stage}-{method}"], zero_runs[f"resume-z{stage}-{method}"]
    assert resumed["losses"] == whole["losses"][STOP:]
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name
