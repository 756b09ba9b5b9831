"""The memory targets of the papers this stack reproduces, planned (megatron_pept.plan: the trainer on fake tensors,
planned for a CUDA device) and asserted: 7B 8-bit GaLore below 22 GB (GaLore, Figure 1: one 24 GB GPU), 7B
Q-GaLore below 16 GB (Q-GaLore: 15.26 GB on a 16 GB GPU), and configs/full_1b.yaml on 8 FSDP2 ranks within an 80 GB
GPU. GB here is GiB (2^30 bytes), as torch.cuda reports and GPUs are sized. Each 7B plan takes about a minute on a
2-core CPU."""

from __future__ import annotations

import pytest

from megatron_pept import registry
from megatron_pept.plan import plan
from megatron_pept.plan.fit import fits

pytestmark = pytest.mark.slow

SEVEN_B = [
    "model.name=7b",
    "model.vocab_size=32000",
    "method.rank=1024",
    "optim.per_layer=true",
    "train.param_dtype=bf16",
    "train.activation_checkpointing=true",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
    "data.seq_len=256",
]


@pytest.mark.parametrize("method,below_gb", [("galore_8bit", 22.0), ("q_galore", 16.0)])
def test_7b_plans_below_the_papers_figures(method: str, below_gb: float) -> None:
    planned = plan(registry.load_config("quickstart", [*SEVEN_B, f"method.name={method}"]))
    assert planned.settings["device"] == "cuda" and planned.settings["compute_dtype"] == "bf16"
    assert 6.7e9 < planned.params < 6.8e9
    assert planned.peak_gb < below_gb, (planned.peak_gb, planned.parts)


def test_full_1b_fits_80gb_on_8_fsdp2_ranks() -> None:
    cfg = registry.load_config("full_1b", ["parallel.backend=fsdp2"])
    planned = plan(cfg, ranks=8)
    assert planned.settings["ranks"] == 8 and planned.settings["micro_batch_size"] == cfg.train.micro_batch_size
    assert fits(planned, 80.0), (planned.peak_gb, planned.parts)
