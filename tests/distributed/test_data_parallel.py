"""Every method on DDP and FSDP2 with 2 gloo ranks (a real torchrun launch) against one process on the same
global batch: equal losses and final weights within a stated tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LOSS_TOL, WEIGHT_TOL, WEIGHT_TOL_8BIT, base, quantised_bases, shared_launch

from megatron_pept.registry import load_config
from megatron_pept.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
METHODS = {
    "full": [],
    "lora": [],
    "relora": ["method.reset_every=2", "method.warm_start_steps=1", "method.restart_warmup_steps=1"],
    "redora": ["method.reset_every=2"],
    "repissa": ["method.reset_every=2"],
    "reloqra": ["method.reset_every=2"],
    "galore": [],
    "galore_ef": [],
    "galore_dynamic_ef": ["method.dynamic_first=2", "method.dynamic_cap=2"],
    "galore_8bit": [],
    "galore_adafactor": [],
    "adam_mini": [],
    "adam_mini@tensor": ["method.adam_mini_partition=tensor"],  # a variant: METHOD@what, see method_name()
}
PER_LAYER = {"full": [], "galore_dynamic_ef": ["method.dynamic_first=2"], "adam_mini": []}


def method_name(key: str) -> str:
    return key.split("@")[0]


# One-process reference runs by their overrides less run_dir: a fixed-seed run is deterministic, so the tests that
# compare several backends (DDP, FSDP2, ZeRO-1/2/3) with the same configuration share one reference run.
_REFERENCES: dict[tuple[str, ...], tuple[list[float], dict[str, torch.Tensor]]] = {}


def single(overrides: list[str]):
    """(losses, parameters and quantised bases) of the run ``overrides`` describes on one process."""
    key = tuple(o for o in overrides if not o.startswith("run_dir="))
    if key not in _REFERENCES:
        trainer = Trainer(load_config(None, overrides))
        result = trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
        _REFERENCES[key] = (result.train_losses, {**params, **quantised_bases(trainer.raw_model)})
        trainer.close()
    return _REFERENCES[key]


@shared_launch("torchrun")
def two_rank_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    runs = []
    for backend in ("ddp", "fsdp2"):
        for method, extra in METHODS.items():
            runs.append(
                {
                    "name": f"{backend}-{method}",
                    "overrides": base(quickstart_data, tmp / f"{backend}-{method}", 2)
                    + [f"parallel.backend={backend}", f"method.name={method_name(method)}", *extra],
                }
            )
    for backend in ("ddp", "fsdp2"):
        for method, extra in PER_LAYER.items():
            overrides = [f"parallel.backend={backend}", f"method.name={method}", "optim.per_layer=true"]
            run_dir = tmp / f"{backend}-pl-{method}"
            runs.append(
                {
                    "name": f"{backend}-per_layer-{method}",
                    "overrides": base(quickstart_data, run_dir, 2) + overrides + ["train.max_grad_norm=0", *extra],
                }
            )
    runs.append(
        {
            "name": "fsdp2-full-checkpointed-compiled",
            "overrides": base(quickstart_data, tmp / "fsdp2-ckpt", 2)
            + ["parallel.backend=fsdp2", "train.activation_checkpointing=true", "train.compile=true"],
        }
    )
    return runs


@pytest.fixture(scope="module")
def two_rank_results(two_rank_runs: tuple[dict, Path]) -> dict:
    return two_rank_runs[0]


def effective(params: dict) -> dict:
    """Parameters with each adapter pair replaced by its product ``B @ A``: SVD and QR factors are defined up to
    the signs of their columns, which rounding-level differences between layouts can flip."""
    out = {}
    for name, value in params.items():
        if name.endswith(".lora_A"):
            continue
        if name.endswith(".lora_B"):
            out[name[: -len("lora_B")] + "BA"] = value @ params[name[: -len("lora_B")] + "lora_A"]
        else:
            out[name] = value
    return out


def compare(two: dict, losses: list[float], params: dict, *, weight_tol: float) -> None:
    assert two["losses"] == pytest.approx(losses, abs=LOSS_TOL)
    assert set(two["params"]) == set(params)
    theirs, ours = effective(two["params"]), effective(params)
    for name, value in ours.items():
        if name.endswith(".dequantized_base"):
            # A master equal to ~1e-7 can still put a weight on the other side of a rounding boundary (one code):
            # the computed bases agree to a fraction of one quantisation step on the whole.
            gap = float((theirs[name] - value).norm() / value.norm())
            assert gap < 1e-3, (name, gap)
        else:
            assert torch.allclose(theirs[name], value, atol=weight_tol), name


QUANTISED = {  # METHOD@FORMAT[-variant]: a quantised frozen base (megatron_pept.quant), restarts every 2 steps
    "relora@int8": ["method.reset_every=2"],
    "relora@nf4": ["method.reset_every=2"],
    "repissa@nf4": ["method.reset_every=2"],
    "relora@nf4-warm": ["method.reset_every=2", "method.warm_start_steps=1"],
    "relora@nf4-nomaster": ["method.reset_every=2", "method.base_master=none"],
    "relora@fp8": ["method.reset_every=2"],  # fp8 storage on CPU; gloo all-gathers no fp8 type: FSDP2's as bytes
}
QUANTISED_RUNS = {  # backend -> the quantised runs it trains (fsdp2 and DeepSpeed refuse a warm start with them)
    "ddp": ["relora@int8", "repissa@nf4", "relora@nf4-warm", "relora@fp8"],
    "fsdp2": ["relora@int8", "relora@nf4", "repissa@nf4", "relora@nf4-nomaster", "relora@fp8"],
    "zero1": ["relora@nf4"],
    "zero2": ["relora@int8", "relora@nf4", "relora@fp8"],
}
BACKEND_OVERRIDES = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
}


def quantised_overrides(data: Path, run_dir: Path, key: str) -> list[str]:
    name, fmt = key.split("@")
    return base(data, run_dir, 2) + [f"method.name={name}", f"method.base_dtype={fmt.split('-')[0]}", *QUANTISED[key]]


def quantised_runs(data: Path, tmp: Path, backends: tuple[str, ...]) -> list[dict]:
    return [
        {
            "name": f"{backend}-{key}",
            "overrides": quantised_overrides(data, tmp / f"{backend}-{key}", key) + BACKEND_OVERRIDES[backend],
        }
        for backend in backends
        for key in QUANTISED_RUNS[backend]
    ]


@shared_launch("torchrun")
def quantised_torchrun(quickstart_data: Path, tmp: Path) -> list[dict]:
    return quantised_runs(quickstart_data, tmp, ("ddp", "fsdp2"))


@shared_launch("deepspeed", optional=True)
def quantised_deepspeed(quickstart_data: Path, tmp: Path) -> list[dict]:
    return quantised_runs(quickstart_data, tmp, ("zero1", "zero2"))


@pytest.fixture(scope="module")
def quantised_results(quantised_torchrun: tuple[dict, Path], quantised_deepspeed: tuple[dict, Path] | None) -> dict:
    return {**quantised_torchrun[0], **(quantised_deepspeed[0] if quantised_deepspeed else {})}


@pytest.mark.parametrize("backend,key", [(b, k) for b, keys in QUANTISED_RUNS.items() for k in keys])
def test_quantised_bases_match_one_process(backend, key, quantised_results, quickstart_data, tmp_path) -> None:
    """Two ranks with a quantised base train like one process: DDP and ZeRO-1/2 replicate the quantised base and
    its master, FSDP2 shards both by rows (the forward gathers one layer's parts at a time); every rank requantises
    the same exact master at a restart. Tolerances as for an fp32 base, except where a requantisation rounds a
    value that sits on a code boundary: RePiSSA quantises the residual its SVD leaves, and without a master
    (base_master=none) each restart requantises a dequantised base plus an update; quantising is discontinuous, so
    a weight on a boundary lands on either code when the gradients differ in the last bit (the ranks reduce them in
    another order; one NF4 code is about a tenth of its block's largest weight). Those agree in losses to 1e-3 and
    in tensors to 5% (relative norm) instead."""
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    losses, params = single(quantised_overrides(quickstart_data, tmp_path, key))
    two = quantised_results[f"{backend}-{key}"]
    layers = sum(name.endswith(".dequantized_base") for name in params)
    assert layers == 7 * 2  # every projection of the debug model holds a quantised base
    per_layer = 2 + ("nomaster" not in key)  # int8, fp8: q and scale, nf4: q and scalers; and the master
    assert int(two["sharded_bases"]) == (layers * per_layer if backend == "fsdp2" else 0)
    if not (key.startswith("repissa") or key.endswith("nomaster")):
        compare(two, losses, params, weight_tol=WEIGHT_TOL)
        return
    assert two["losses"][:2] == pytest.approx(losses[:2], abs=LOSS_TOL)  # before the first restart: as for fp32
    assert two["losses"] == pytest.approx(losses, abs=1e-3)
    theirs, ours = effective(two["params"]), effective(params)
    assert set(theirs) == set(ours)
    for name, value in ours.items():
        if key.startswith("repissa") and (name.endswith(".base_master") or name.endswith(".dequantized_base")):
            continue  # the residual of a top-r SVD whose r-th and (r+1)-th singular values are close can swap a
            # direction between the factors and the residual: the factors' product and the losses are compared
        gap = float((theirs[name] - value).norm() / value.norm().clamp_min(1e-12))
        assert gap < 5e-2, (name, gap)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_match_one_process(method, backend, two_rank_results, quickstart_data, tmp_path) -> None:
    losses, params = single(
        base(quickstart_data, tmp_path, 2) + [f"method.name={method_name(method)}", *METHODS[method]]
    )
    tol = WEIGHT_TOL_8BIT if method == "galore_8bit" else WEIGHT_TOL
    compare(two_rank_results[f"{backend}-{method}"], losses, params, weight_tol=tol)


def test_validation_loss_does_not_depend_on_the_number_of_ranks(
    two_rank_results, deepspeed_results, quickstart_data, tmp_path
) -> None:
    """The same validation windows, split over the ranks: val/loss on 2 ranks equals one process's to float
    rounding (the ranks used to evaluate a rank-count-dependent set, which moved it in the 4th decimal)."""
    trainer = Trainer(load_config(None, base(quickstart_data, tmp_path, 2)))
    val = list(trainer.train().val_losses.values())
    assert len(val) == 1  # validated once, after the last step
    for run in (two_rank_results["ddp-full"], two_rank_results["fsdp2-full"]):
        assert run["val_losses"].tolist() == pytest.approx(val, abs=1e-6)
    single_3 = Trainer(load_config(None, base(quickstart_data, tmp_path / "3", 2) + DEEPSPEED_MODEL)).train()
    for stage in (1, 3):
        run = deepspeed_results[f"zero{stage}-full"]
        assert run["val_losses"].tolist() == pytest.approx(list(single_3.val_losses.values()), abs=1e-6)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", list(PER_LAYER))
def test_per_layer_under_data_parallel_matches_one_process(
    method, backend, two_rank_results, quickstart_data, tmp_path
) -> None:
    overrides = base(quickstart_data, tmp_path, 2) + [
        f"method.name={method}",
        "train.max_grad_norm=0",
        *PER_LAYER[method],
    ]
    losses, params = single(overrides)
    compare(two_rank_results[f"{backend}-per_layer-{method}"], losses, params, weight_tol=WEIGHT_TOL)


def test_fsdp2_with_activation_checkpointing_and_compile_matches_one_process(
    two_rank_results, quickstart_data, tmp_path
) -> None:
    """Each block recomputed in backward and compiled by torch.compile, under FSDP2: the same training as one
    eager process without recomputation."""
    losses, params = single(base(quickstart_data, tmp_path, 2))
    compare(two_rank_results["fsdp2-full-checkpointed-compiled"], losses, params, weight_tol=WEIGHT_TOL)


DEEPSPEED_METHODS = list(METHODS)  # every method, on ZeRO-2 and -3
# ZeRO-1 hands the optimizer the same flat partitions as ZeRO-2 (stage 2 also partitions the gradients, which
# DeepSpeed does before the optimizer sees them): every method's optimizer path is covered by stage 2, and stage 1
# runs one method of each kind (element-wise, restarts through the masters, projected fragments, block statistics).
ZERO1_METHODS = ("full", "relora", "galore", "adam_mini")
DEEPSPEED_CASES = [(m, s) for s in (1, 2, 3) for m in DEEPSPEED_METHODS if s != 1 or m in ZERO1_METHODS]
# Three layers: ZeRO-1/2 cut each parameter group's concatenation in half, which then falls inside a matrix (with two
# equal layers it falls between them and no matrix would be split across ranks).
# An odd MLP width: ZeRO-3 halves each matrix, and the cut then falls inside a row of gate/up_proj (projected on the
# right, whose boundary rows are completed across ranks).
DEEPSPEED_MODEL = ["model.num_layers=3", "model.intermediate_size=101"]


@shared_launch("deepspeed")
def deepspeed_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    return [
        {
            "name": f"zero{stage}-{method}",
            "overrides": base(quickstart_data, tmp / f"z{stage}-{method}", 2)
            + [
                "parallel.backend=deepspeed",
                f"parallel.zero_stage={stage}",
                f"method.name={method_name(method)}",
                *DEEPSPEED_MODEL,
                *[o for o in METHODS[method] if "warm_start" not in o],
            ],
        }
        for method, stage in DEEPSPEED_CASES
    ]


@pytest.fixture(scope="module")
def deepspeed_results(deepspeed_runs: tuple[dict, Path]) -> dict:
    return deepspeed_runs[0]


@pytest.mark.parametrize("method,stage", DEEPSPEED_CASES)
def test_deepspeed_zero_matches_one_process(method, stage, deepspeed_results, quickstart_data, tmp_path) -> None:
    extra = [o for o in METHODS[method] if "warm_start" not in o]
    name = method_name(method)
    losses, params = single(base(quickstart_data, tmp_path, 2) + [f"method.name={name}", *DEEPSPEED_MODEL, *extra])
    tol = WEIGHT_TOL_8BIT if method == "galore_8bit" else WEIGHT_TOL
    run = deepspeed_results[f"zero{stage}-{method}"]
    compare(run, losses, params, weight_tol=tol)
    if name.startswith("galore") or name == "adam_mini":
        assert int(run["split"]) >= 1  # some matrix is cut between the ranks: the fragment collectives are exercised
    if name.startswith("galore"):
        assert int(run["midrow"]) >= 1  # a right-projected matrix is cut inside a row


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["parallel.backend=deepspeed", "optim.per_layer=true"], "DeepSpeed owns the optimizer step"),
        (["parallel.backend=deepspeed", "method.name=relora", "method.warm_start_steps=5"], "fixed set"),
        (
            ["parallel.backend=fsdp2", "method.name=relora", "method.warm_start_steps=5", "method.base_dtype=bf16"],
            "cannot change a sharded parameter's dtype",
        ),
    ],
)
def test_unsupported_combinations_are_refused(overrides: list[str], match: str) -> None:
    from megatron_pept.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.path=x", *overrides])


INIT_FROM_RUNS = {  # name -> backend overrides and method: a run that starts from an HF folder
    "fsdp2-relora": ["parallel.backend=fsdp2", "method.name=relora", "method.reset_every=2"],
    "ddp-galore": ["parallel.backend=ddp", "method.name=galore"],
    "zero2-full": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "method.name=full"],
    "zero3-relora": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "method.name=relora"],
}


def hf_source(tmp: Path) -> Path:
    """The folder of the HF export the init_from runs start from (beside the plans' own folders)."""
    return tmp.parent / "init-from-source" / "hf"


def init_from_runs(data: Path, tmp: Path, *, deepspeed: bool) -> list[dict]:
    folder = hf_source(tmp)
    if not folder.exists():  # an HF export of a short run, made once for both launchers
        pytest.importorskip("transformers")
        from megatron_pept.checkpoint.hf_export import export_to_hf

        source = base(data, folder.parent / "run", 2) + ["train.steps=30", "checkpoint.interval=30"]
        Trainer(load_config(None, source)).train()
        export_to_hf(folder.parent / "run", folder)
    return [
        {"name": name, "overrides": base(data, tmp / name, 2) + [f"model.init_from={folder}", *extra]}
        for name, extra in INIT_FROM_RUNS.items()
        if deepspeed == name.startswith("zero")
    ]


@shared_launch("torchrun")
def init_from_torchrun(quickstart_data: Path, tmp: Path) -> list[dict]:
    return init_from_runs(quickstart_data, tmp, deepspeed=False)


@shared_launch("deepspeed", optional=True)
def init_from_deepspeed(quickstart_data: Path, tmp: Path) -> list[dict]:
    return init_from_runs(quickstart_data, tmp, deepspeed=True)


@pytest.fixture(scope="module")
def init_from_results(
    init_from_torchrun: tuple[dict, Path], init_from_deepspeed: tuple[dict, Path] | None
) -> tuple[dict, Path]:
    """An HF export of a short run, then 2-rank runs of several methods and backends that start from it."""
    results, tmp = init_from_torchrun
    return {**results, **(init_from_deepspeed[0] if init_from_deepspeed else {})}, hf_source(tmp)


@pytest.mark.parametrize("name", list(INIT_FROM_RUNS))
def test_init_from_an_hf_folder_under_every_backend_matches_one_process(
    name, init_from_results, quickstart_data, tmp_path
) -> None:
    """model.init_from loads before the model is sharded, so two ranks of any backend start from the same weights
    and train like one process (the loss of the first step already shows the loaded weights)."""
    results, folder = init_from_results
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")
    extra = [o for o in INIT_FROM_RUNS[name] if not o.startswith("parallel.")]
    losses, params = single(base(quickstart_data, tmp_path, 2) + [f"model.init_from={folder}", *extra])
    fresh, _ = single(base(quickstart_data, tmp_path / "fresh", 2) + extra)
    assert losses[0] < fresh[0] - 0.5, (losses, fresh)  # it did start from the trained weights
    compare(results[name], losses, params, weight_tol=WEIGHT_TOL)
