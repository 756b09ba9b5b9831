"""Learning-rate schedules and the bf16-moment AdamW."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_pept.config import OptimConfig
from megatron_pept.optim import LowPrecisionAdamW, build_adamw, build_schedule, decay_param_groups


def test_warmup_cosine_values_at_known_steps() -> None:
    sched = build_schedule(OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), total_steps=110)
    assert sched(0) == pytest.approx(0.1)
    assert sched(4) == pytest.approx(0.5)
    assert sched(9) == pytest.approx(1.0)
    assert sched(10) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert sched(110) == pytest.approx(0.1)
    values = [sched(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant() -> None:
    lin = build_schedule(OptimConfig(warmup_steps=0, min_lr_ratio=0.0, schedule="linear"), total_steps=100)
    assert [lin(0), lin(50), lin(100)] == pytest.approx([1.0, 0.5, 0.0])
    const = build_schedule(OptimConfig(warmup_steps=4, schedule="constant"), total_steps=100)
    assert [const(0), const(3), const(99)] == pytest.approx([0.25, 1.0, 1.0])


def _run(opt_cls, steps: int = 5, **kwargs) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = opt_cls([w], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(16, 8, generator=gen)
        opt.step()
    return w.detach(), opt


def test_low_precision_adamw_with_fp32_state_is_torch_adamw() -> None:
    ours, _ = _run(LowPrecisionAdamW, state_dtype=torch.float32)
    ref, _ = _run(torch.optim.AdamW, foreach=False)
    assert torch.equal(ours, ref)


def test_bf16_moments_are_bf16_and_close() -> None:
    ours, opt = _run(LowPrecisionAdamW, state_dtype=torch.bfloat16)
    ref, _ = _run(torch.optim.AdamW, foreach=False)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert (ours - ref).abs().max().item() < 1e-3
    assert not torch.equal(ours, ref)


def test_build_adamw_and_decay_groups() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = decay_param_groups(model.named_parameters(), weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]  # the matrix decays; biases and norm weight do not
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]

    def fresh() -> list[dict]:  # torch.optim writes defaults into the group dicts it is given
        return decay_param_groups(model.named_parameters(), weight_decay=0.1)

    assert isinstance(build_adamw(fresh(), OptimConfig(state_dtype="fp32")), torch.optim.AdamW)
    assert isinstance(build_adamw(fresh(), OptimConfig(state_dtype="bf16")), LowPrecisionAdamW)
    assert math.isclose(build_adamw(fresh(), OptimConfig(lr=0.5)).param_groups[0]["lr"], 0.5)
