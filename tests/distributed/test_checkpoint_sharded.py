"""Checkpoints under FSDP2 with 2 gloo ranks: an interrupted run resumed on 2 ranks ends bit-identical to an
uninterrupted one; the same checkpoint resumed on 1 process (resharded model, optimizer and GaLore state) trains
on like the 2-rank run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LOSS_TOL, WEIGHT_TOL, base, launch, quantised_bases, resume_from, saving_at, shared_launch

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


# The case whose checkpoint comes from an interrupted run (stopped after STOP, resumed in its run_dir); the others
# resume from the checkpoint their uninterrupted run saved after STOP (helpers.saving_at).
INTERRUPTED = "full"


def checkpoint_at_stop(tmp: Path, method: str) -> Path:
    """The run_dir holding ``method``'s FSDP2 checkpoint of step STOP."""
    return tmp / (f"cut-{method}" if method == INTERRUPTED else f"whole-{method}")


@shared_launch("torchrun")
def fsdp2_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    runs = []
    for method in METHODS:
        whole, cut = tmp / f"whole-{method}", overrides(quickstart_data, tmp / f"cut-{method}", method)
        if method == INTERRUPTED:
            runs.append({"name": f"whole-{method}", "overrides": overrides(quickstart_data, whole, method)})
            runs.append({"name": f"stop-{method}", "overrides": cut, "stop_after": STOP})
            runs.append({"name": f"resume-{method}", "overrides": cut})
        else:
            runs.append(
                {"name": f"whole-{method}", "overrides": [*overrides(quickstart_data, whole, method), *saving_at(STOP)]}
            )
            runs.append({"name": f"resume-{method}", "overrides": [*cut, resume_from(whole, STOP)]})
    for name, (backend, extra, stop) in MORE.items():
        common = [f"parallel.backend={backend}", *extra]
        whole = tmp / f"w-{name}"
        runs.append(
            {
                "name": f"whole-{name}",
                "overrides": [*overrides(quickstart_data, whole, "full"), *common, *saving_at(stop)],
            }
        )
        cut = [*overrides(quickstart_data, tmp / f"c-{name}", "full"), *common, resume_from(whole, stop)]
        runs.append({"name": f"resume-{name}", "overrides": cut})
    cut = [*overrides(quickstart_data, tmp / "cut-async", "galore_dynamic_ef"), "checkpoint.async_save=true"]
    runs.append({"name": "stop-async", "overrides": cut, "stop_after": STOP})
    runs.append({"name": "resume-async", "overrides": cut})
    return runs


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
def test_fsdp2_checkpoint_resumes_on_one_process(
    method: str, fsdp2_runs, quickstart_data: Path, tmp_path: Path
) -> None:
    results, tmp = fsdp2_runs
    saved = resume_from(checkpoint_at_stop(tmp, method), STOP)
    cfg = load_config(None, [*overrides(quickstart_data, tmp_path, method), "parallel.backend=single", saved])
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


@shared_launch("deepspeed")
def zero_launch(quickstart_data: Path, tmp: Path) -> list[dict]:
    runs = []
    for method, stage in ZERO_CASES:
        name = f"z{stage}-{method}"
        whole, cut = tmp / f"w-{name}", zero_overrides(quickstart_data, tmp / f"c-{name}", method, stage)
        if method == INTERRUPTED and stage == 2:
            runs.append({"name": f"whole-{name}", "overrides": zero_overrides(quickstart_data, whole, method, stage)})
            runs.append({"name": f"stop-{name}", "overrides": cut, "stop_after": STOP})
            runs.append({"name": f"resume-{name}", "overrides": cut})
        else:
            runs.append(
                {
                    "name": f"whole-{name}",
                    "overrides": [*zero_overrides(quickstart_data, whole, method, stage), *saving_at(STOP)],
                }
            )
            runs.append({"name": f"resume-{name}", "overrides": [*cut, resume_from(whole, STOP)]})
    return runs


@pytest.fixture(scope="module")
def zero_runs(zero_launch: tuple[dict, Path]) -> dict:
    return zero_launch[0]


@pytest.mark.parametrize("method,stage", ZERO_CASES)
def test_deepspeed_resume_is_bit_identical(method: str, stage: int, zero_runs) -> None:
    """DeepSpeed's own checkpoint (loaded without executing pickled code) plus our state: the GaLore and Adam-mini
    fragments' state, the method, the loader and RNG."""
    whole, resumed = zero_runs[f"whole-z{stage}-{method}"], zero_runs[f"resume-z{stage}-{method}"]
    assert resumed["losses"] == whole["losses"][STOP:]
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name


# -- DeepSpeed checkpoints exported to Hugging Face -----------------------------------------------------------------

# ReLoRA on every ZeRO stage (a restart at step 3 merges into the frozen weights), and a quantised base on ZeRO-2.
DS_EXPORT_CASES = {
    "z1-relora": (1, []),
    "z2-relora": (2, []),
    "z3-relora": (3, []),
    "z2-relora@nf4": (2, ["method.base_dtype=nf4"]),
}


@shared_launch("deepspeed")
def zero_export_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    return [
        {
            "name": name,
            "overrides": base(quickstart_data, tmp / name, 2)
            + [
                "train.steps=5",
                "parallel.backend=deepspeed",
                f"parallel.zero_stage={stage}",
                "model.num_layers=3",
                "method.name=relora",
                "method.reset_every=3",
                "checkpoint.interval=100",
                *extra,
            ],
        }
        for name, (stage, extra) in DS_EXPORT_CASES.items()
    ]


def merged_reference_logits(params: dict, checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of our plain model holding the final weights the 2-rank run reported, each ReLoRA layer merged here
    (W + alpha/rank B A, W the frozen weight or the base the quantised layer computes with): independent of the
    export's reading of DeepSpeed's files and of the method's own merge."""
    import json

    from megatron_pept.models import build_model
    from megatron_pept.models.llama import LlamaArgs

    meta = json.loads((checkpoint / "meta.json").read_text())
    scale = meta["config"]["method"]["alpha"] / meta["config"]["method"]["rank"]
    model = build_model(LlamaArgs(**meta["model_args"]), device="cpu")
    state = {}
    for name in model.state_dict():
        stem = name.removesuffix(".weight")
        if f"{stem}.lora_A" in params:
            frozen = params.get(name, params.get(f"{stem}.dequantized_base"))
            state[name] = frozen + scale * params[f"{stem}.lora_B"] @ params[f"{stem}.lora_A"]
        else:
            state[name] = params[name]
    model.load_state_dict(state)
    model.init_rope()
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("name", list(DS_EXPORT_CASES))
def test_deepspeed_checkpoint_exports_to_hf(name: str, zero_export_runs) -> None:
    """A 2-rank ZeRO checkpoint exports: DeepSpeed's own consolidation (trained masters from the optimizer
    partitions, frozen weights from the module states, buffers such as the quantised base's parts), then the
    method's merge; transformers' logits equal those of the weights the run ended with."""
    transformers = pytest.importorskip("transformers")
    from megatron_pept.checkpoint.hf_export import export_to_hf

    results, tmp = zero_export_runs
    (checkpoint,) = sorted((tmp / name / "checkpoints").glob("step_*"))
    assert (checkpoint / "deepspeed" / "latest").read_text() == "state"  # zero_to_fp32 needs no --tag
    params = results[name]["params"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_to_hf(tmp / name, tmp / f"hf-{name}")).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, merged_reference_logits(params, checkpoint, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["z1-relora", "z2-relora", "z3-relora"])
def test_deepspeed_zero_to_fp32_runs_without_tag(name: str, zero_export_runs, tmp_path: Path) -> None:
    """DeepSpeed's own script beside the checkpoint finds the tag in the `latest` file save_native writes; the
    weights it consolidates are the run's final ones (the trained parameters; frozen ones from ZeRO-2 on)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    results, tmp = zero_export_runs
    (checkpoint,) = sorted((tmp / name / "checkpoints").glob("step_*"))
    folder = checkpoint / "deepspeed"
    proc = subprocess.run(
        [sys.executable, str(folder / "zero_to_fp32.py"), str(folder), str(tmp_path / "out"), "--safe_serialization"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    consolidated = load_file(tmp_path / "out" / "model.safetensors")
    params = results[name]["params"]
    trained = {k for k in params if k.endswith((".lora_A", ".lora_B")) or "embed" in k or "norm" in k}
    assert trained <= consolidated.keys()
    if not name.startswith("z1"):
        assert consolidated.keys() == params.keys()
    for key, value in consolidated.items():
        assert torch.equal(value, params[key]), key


def test_an_unreadable_deepspeed_checkpoint_names_zero_to_fp32(zero_export_runs, tmp_path: Path) -> None:
    """What the export cannot consolidate (here a rank's partition gone) is one line naming DeepSpeed's script."""
    import shutil

    from megatron_pept.checkpoint.hf_export import dense_state_dict
    from megatron_pept.errors import UserError

    _, tmp = zero_export_runs
    (checkpoint,) = sorted((tmp / "z2-relora" / "checkpoints").glob("step_*"))
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    (copy / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match=r"cannot be exported \(.*\); .*zero_to_fp32\.py .* --tag state") as err:
        dense_state_dict(copy)
    assert "\n" not in str(err.value)


def test_a_poisoned_deepspeed_checkpoint_is_refused_on_resume(
    quickstart_data: Path, zero_export_runs, tmp_path
) -> None:
    """A ZeRO-2 run resumes our state from DCP (train, method, loader) and the model and optimizer from DeepSpeed's
    files: a .metadata that runs a command, or a DeepSpeed file holding a pickled object that would, is refused on
    every rank in one line, and the command never runs (issue 25: the first used to run and then resume)."""
    import shutil

    from poisoned import Command, poison

    from megatron_pept.checkpoint import store

    _, tmp = zero_export_runs
    runs, marker = [], tmp_path / "pwned"
    for case in ("metadata", "deepspeed-file"):
        run_dir = tmp_path / case
        shutil.copytree(
            tmp / "z2-relora", run_dir
        )  # the whole run folder: its run.json says the checkpoints are its own
        (checkpoint,) = sorted((run_dir / "checkpoints").glob("step_*"))
        if case == "metadata":
            poison(checkpoint, marker)
        else:
            model_file = checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
            saved = torch.load(model_file, weights_only=False)  # our own test file
            saved["payload"] = Command(f"touch {marker}")
            torch.save(saved, model_file)
            (checkpoint / store.MARKER).unlink()
            store.write_marker(checkpoint)
        overrides = base(quickstart_data, run_dir, 2) + [
            "train.steps=6",
            "parallel.backend=deepspeed",
            "parallel.zero_stage=2",
            "model.num_layers=3",
            "method.name=relora",
            "method.reset_every=3",
            "checkpoint.interval=100",
        ]
        runs.append({"name": case, "overrides": overrides, "expect_error": True})
    results = launch(runs, tmp_path, launcher="deepspeed")
    assert "was refused: it refers to operator.itemgetter" in results["metadata"]["error"]
    assert "holds objects a safe load does not allow" in results["deepspeed-file"]["error"]
    assert all("\n" not in r["error"] for r in results.values())
    assert not marker.exists()
