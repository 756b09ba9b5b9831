"""In-process exact resume, including across ReLoRA's warm-start switch (the method's phase decides which
parameters train, so the optimizer is rebuilt for the saved phase before its state is loaded) and with
per-layer updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import tiny

from megatron_pept.trainer import Trainer

CASES = {
    "relora-warm-start": ["method.name=relora", "method.rank=4", "method.warm_start_steps=3", "method.reset_every=2"],
    "lora-warm-start": ["method.name=lora", "method.rank=4", "method.warm_start_steps=3"],
    "relora-nf4-base-warm-start": [
        "method.name=relora",
        "method.rank=4",
        "method.warm_start_steps=3",
        "method.reset_every=2",
        "method.base_dtype=nf4",
    ],
    "redora-int8-base": ["method.name=redora", "method.rank=4", "method.reset_every=2", "method.base_dtype=int8"],
    "relora-fp8-base": ["method.name=relora", "method.rank=4", "method.reset_every=2", "method.base_dtype=fp8"],
    "relora-bf16-base-warm-start": [
        "method.name=relora",
        "method.rank=4",
        "method.warm_start_steps=3",
        "method.reset_every=2",
        "method.base_dtype=bf16",
    ],
    "galore-per-layer": [
        "method.name=galore_dynamic_ef",
        "method.rank=4",
        "optim.per_layer=true",
        "train.max_grad_norm=0",
        "method.dynamic_first=2",
        "method.dynamic_cap=3",
    ],
    "adam_mini": ["method.name=adam_mini"],
    "galore_8bit": ["method.name=galore_8bit", "method.rank=4", "method.update_proj_gap=3"],
    "q_galore": [  # int8 weights (stochastic rounding), int4 projectors, a gap that grows (2 -> 4 at step 4)
        "method.name=q_galore",
        "method.rank=4",
        "method.update_proj_gap=2",
        "method.queue_size=2",
        "method.cos_threshold=-1",
        "method.weight_group_size=16",
        "method.proj_group_size=32",
    ],
}


@pytest.mark.parametrize("stop", [2, 5])  # before and after the warm-start switch at step 3
@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(case: str, stop: int, quickstart_data: Path, tmp_path: Path) -> None:
    extra = [*CASES[case], "train.steps=8", "checkpoint.interval=100"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "whole", *extra))
    losses = whole.train().train_losses
    cut = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra))
    for _ in range(stop):
        cut.train_step()
    cut.save_checkpoint()
    cut.close()  # the interrupted run's process is over
    resumed = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra))
    assert resumed.state.step == stop
    assert resumed.train().train_losses == losses[stop:]
    final = dict(resumed.raw_model.named_parameters())
    for name, value in whole.raw_model.named_parameters():
        assert torch.equal(final[name], value), name
    trainable = {n for n, p in resumed.raw_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in whole.raw_model.named_parameters() if p.requires_grad}


def test_a_bf16_base_warm_starts_on_an_fp32_master(quickstart_data: Path, tmp_path: Path) -> None:
    """With method.base_dtype=bf16 the full-rank warm start trains an fp32 master (exactly full-rank training, no
    update lost to bf16 rounding); at the switch the base is stored in bf16, rounded once."""
    relora = ["method.name=relora", "method.rank=4", "method.base_dtype=bf16", "method.warm_start_steps=3"]
    warm = Trainer(tiny(quickstart_data, tmp_path / "warm", *relora, "train.steps=2"))
    full = Trainer(tiny(quickstart_data, tmp_path / "full", "train.steps=2"))
    assert warm.train().train_losses == full.train().train_losses
    reference = dict(full.raw_model.named_parameters())
    for name, p in warm.raw_model.named_parameters():
        if not name.endswith(("lora_A", "lora_B")):
            assert p.dtype == torch.float32 and torch.equal(p, reference[name]), name
    switched = Trainer(tiny(quickstart_data, tmp_path / "switch", *relora, "train.steps=4"))
    switched.train()
    layer = switched.raw_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lowrank_active and layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
