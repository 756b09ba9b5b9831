"""Start-up without a whole copy (issue 28 item 3), with 2 gloo ranks (a real torchrun launch): the initial weights
are the same, bit for bit, on one process, on 2 DDP ranks and on 2 FSDP2 ranks (also after a method's after_init
and from ``model.init_from``), and an FSDP2 rank never holds the whole model while it starts (torch's memory
tracker over the whole trainer build, worker.py's ``init_only`` runs). A quantised base (``relora@int8``) starts one
block at a time under FSDP2: each block materialised whole, initialised (or loaded), quantised and sharded before
the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base, quantised_bases, shared_launch

from megatron_pept.config import ModelConfig, load_config
from megatron_pept.trainer import Trainer

# Layers outweigh the embeddings here (8 blocks of width 128, vocabulary 1024), so "half the model plus one tensor"
# and "the whole model" are far apart.
SHAPE = ["model.num_layers=8", "model.hidden_size=128"]
METHODS = {
    "full": [],
    "lora": [],  # adapters drawn by after_init on the shards
    "repissa": [],  # an SVD of each (gathered) weight, one at a time
    "relora@int8": ["method.name=relora", "method.base_dtype=int8"],  # quantised: whole, then sharded
}
BACKENDS = ("ddp", "fsdp2")
# Runs started from model.init_from, by the method they convert the loaded weights with (with a quantised base,
# FSDP2 loads, quantises and shards one block at a time).
INIT_FROM = {"init_from": "lora", "init_from@int8": "relora@int8"}


def overrides(data: Path, run_dir: Path, key: str) -> list[str]:
    extra = METHODS[key] or [f"method.name={key}"]
    return [*base(data, run_dir, 2), *SHAPE, *extra]


def write_hf_folder(data: Path, folder: Path) -> None:
    """A Hugging Face LLaMA folder for this shape (another seed than the runs), made without the trainer."""
    from safetensors.torch import save_file

    from megatron_pept.data.shards import read_index
    from megatron_pept.models import build_model, llama_args
    from megatron_pept.models.hf import hf_config_dict

    cfg = ModelConfig(name="debug", num_layers=8, hidden_size=128)  # SHAPE
    args = llama_args(cfg, vocab_size=read_index(data).vocab_size, max_seq_len=32)
    model = build_model(args, device="cpu")
    generator = torch.Generator().manual_seed(99)
    state = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_dict(args)))


@shared_launch("torchrun")
def init_runs(quickstart_data: Path, tmp: Path) -> list[dict]:
    runs = [
        {
            "name": f"{backend}-{key}",
            "init_only": True,
            "overrides": overrides(quickstart_data, tmp / backend / key, key),
        }
        for backend in BACKENDS
        for key in METHODS
    ]
    write_hf_folder(quickstart_data, tmp / "hf")
    for backend in BACKENDS:
        for key, method in INIT_FROM.items():
            runs.append(
                {
                    "name": f"{backend}-{key}",
                    "init_only": True,
                    "overrides": [*overrides(quickstart_data, tmp / backend / key, method)]
                    + [f"model.init_from={tmp / 'hf'}", f"parallel.backend={backend}"],
                }
            )
    for run in runs[: len(BACKENDS) * len(METHODS)]:
        run["overrides"].append(f"parallel.backend={run['name'].split('-')[0]}")
    return runs


def one_process(run_dir: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    """The initial weights of the same run on one process (``parallel.backend=single``)."""
    trainer = Trainer(load_config(None, [*extra, f"run_dir={run_dir}"]))
    try:
        params = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
        return {**params, **quantised_bases(trainer.raw_model)}
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("key", [*METHODS, *INIT_FROM])
def test_initial_weights_are_the_same_on_one_process_ddp_and_fsdp2(
    key: str, init_runs: tuple[dict, Path], quickstart_data: Path, tmp_path: Path
) -> None:
    results, tmp = init_runs
    if key in INIT_FROM:
        extra = [*overrides(quickstart_data, tmp_path, INIT_FROM[key]), f"model.init_from={tmp / 'hf'}"]
    else:
        extra = overrides(quickstart_data, tmp_path, key)
    ours = one_process(tmp_path / "single", extra)
    if key == "init_from":  # the folder's weights, not the seeded ones
        from safetensors.torch import load_file

        for name, value in load_file(tmp / "hf" / "model.safetensors").items():
            assert torch.equal(ours[name], value), name
    for backend in BACKENDS:
        theirs = results[f"{backend}-{key}"]["params"]
        assert set(theirs) == set(ours), backend
        for name, value in ours.items():
            assert torch.equal(theirs[name], value), (backend, name)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["full", "lora", "repissa", "relora@int8", *INIT_FROM])
def test_an_fsdp2_rank_never_holds_the_whole_model_while_starting(
    key: str, init_runs: tuple[dict, Path], quickstart_data: Path
) -> None:
    results, _ = init_runs
    fsdp2, ddp = results[f"fsdp2-{key}"], results[f"ddp-{key}"]
    weights = ddp["params"]
    whole = int(ddp["held_bytes"][0])  # what a replica holds: every parameter and buffer
    largest = max(t.numel() * t.element_size() for t in weights.values())
    # A layer's tensors together (the bound is the sharded model plus one layer; ours is one tensor).
    layer = sum(t.numel() * t.element_size() for n, t in weights.items() if n.startswith("model.layers.0."))
    for rank in range(2):
        held, peak = int(fsdp2["held_bytes"][rank]), int(fsdp2["peak_bytes"][rank])
        # Each rank keeps half the parameters (buffers, such as the rotary tables and RePiSSA's initial factors,
        # stay whole).
        assert held < 0.6 * whole, (rank, held, whole)
        # The build's peak: the rank's shards plus one tensor drawn or read whole, plus the small tensors of the
        # data and the run (under 1% of this model).
        assert peak <= held + max(largest, layer) + 0.01 * whole, (rank, peak, held, largest, whole)
        assert peak < whole, (rank, peak, whole)
        # The tracker does see a whole copy where there is one: a DDP replica's build peaks at the whole model.
        assert int(ddp["peak_bytes"][rank]) >= whole, (rank, int(ddp["peak_bytes"][rank]), whole)
