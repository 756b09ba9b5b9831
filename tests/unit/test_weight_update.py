"""Weights held in bf16 with no fp32 copy (``train.param_dtype=bf16``) and the rules that round each update into
them (``optim.weight_update``: stochastic, kahan, nearest; :mod:`megatron_pept.optim.weight_update`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import tiny

from megatron_pept import seeded
from megatron_pept.errors import ConfigError
from megatron_pept.optim.adamw import LowPrecisionWeightAdamW
from megatron_pept.optim.weight_update import WeightUpdate, random_bits, stochastic_round
from megatron_pept.registry import load_config
from megatron_pept.trainer import Trainer


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value (equal where it is a bf16 value)."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)  # truncation: towards zero
    up = ((bits & -65536) + ((bits & 0xFFFF) != 0).to(torch.int32) * 65536).view(torch.float32)  # away from zero
    low, high = torch.minimum(down, up), torch.maximum(down, up)
    return low, high


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased() -> None:
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(64, generator=gen) * torch.logspace(-6, 3, 64)
    low, high = bf16_neighbours(exact)
    draws = torch.stack(
        [
            stochastic_round(exact, torch.randint(0, 1 << 16, exact.shape, generator=gen, dtype=torch.int32)).float()
            for _ in range(4000)
        ]
    )
    assert bool(((draws == low) | (draws == high)).all())
    # The mean of 4000 draws of a two-valued variable: within 5 standard errors of the exact value.
    spread = (high - low) * 0.5 / 4000**0.5
    assert bool(((draws.mean(0) - exact).abs() <= 5 * spread + 1e-30).all())
    already = exact.bfloat16().float()  # a bf16 value is never moved
    ones = torch.full(exact.shape, (1 << 16) - 1, dtype=torch.int32)
    assert torch.equal(stochastic_round(already, ones).float(), already)


def test_rounding_bits_do_not_depend_on_the_rows_a_rank_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seeded, "BLOCK_NUMEL", 3 * 16)  # 3 rows a block: shards begin and end inside blocks
    shape = (23, 16)
    kwargs = dict(name="w", seed=4, count=7, shape=shape, device="cpu")
    whole = random_bits(start=0, rows=23, **kwargs)
    for world in (2, 3, 23):
        pieces = [random_bits(start=int(c[0]), rows=len(c), **kwargs) for c in torch.arange(23).chunk(world)]
        assert torch.equal(torch.cat(pieces), whole), world
    assert not torch.equal(random_bits(start=0, rows=23, **{**kwargs, "count": 8}), whole)  # a new draw each update
    assert int(whole.min()) >= 0 and int(whole.max()) < 1 << 16


@pytest.mark.parametrize("mode", ["kahan", "nearest"])
def test_adamw_on_bf16_weights_equals_torch_optimi(mode: str) -> None:
    """torch-optimi 0.3.3's AdamW on bf16 weights (its moments in bf16, as it keeps them), with and without its
    Kahan summation, bit for bit over 30 steps."""
    optimi = pytest.importorskip("optimi", reason="torch-optimi (the dev extra) is the reference")
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(48, 40, generator=gen).bfloat16(), torch.randn(40, generator=gen).bfloat16()]
    ours = [w.clone().requires_grad_() for w in start]
    theirs = [w.clone().requires_grad_() for w in start]
    update = WeightUpdate(mode, seed=0, names={p: f"w{i}" for i, p in enumerate(ours)})
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)
    ours_opt = LowPrecisionWeightAdamW(ours, state_dtype=torch.bfloat16, weight_update=update, **kw)
    ref = optimi.AdamW(theirs, kahan_sum=mode == "kahan", foreach=False, triton=False, **kw)
    for _ in range(30):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen).bfloat16()
            b.grad = a.grad.clone()
        ours_opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    if mode == "kahan":
        assert torch.equal(ours_opt.state[ours[0]]["kahan_comp"], ref.state[theirs[0]]["kahan_comp"])


def test_small_updates_are_lost_to_nearest_and_kept_by_kahan_and_stochastic() -> None:
    """A constant update of a hundredth of a bf16 step, 400 times: round-to-nearest never moves the weight (the
    reason its curves stall as the learning rate decays); Kahan summation ends within a bf16 step of the exact sum,
    stochastic rounding within a few (its error is a random walk)."""
    gen = torch.Generator().manual_seed(2)
    start = (torch.rand(256, generator=gen) + 1.0).bfloat16()  # in [1, 2): a bf16 step is 2^-7
    delta = torch.full((256,), 2.0**-7 / 100)
    exact = start.float() + 400 * delta
    ends = {}
    for mode in ("nearest", "kahan", "stochastic"):
        w = start.clone()
        update = WeightUpdate(mode, seed=0, names={w: "w"})
        state: dict = {}
        update.init_state(state, w)
        for _ in range(400):
            update.add_(w, w, state, delta)
        ends[mode] = w.float()
    step = 2.0**-7
    assert torch.equal(ends["nearest"], start.float())
    assert float((ends["kahan"] - exact).abs().max()) <= step
    # A random walk of 400 roundings, each up with probability ~1/100: a standard deviation of about 2 steps per
    # weight, and a mean over 256 weights within 4 of its standard errors (0.125 step) of the exact sum.
    assert float((ends["stochastic"] - exact).abs().mean()) <= 4 * step
    assert abs(float((ends["stochastic"] - exact).mean())) <= 0.5 * step


def test_weight_decay_on_bf16_weights_is_rounded_like_the_update() -> None:
    """Decay by 1 - lr * wd = 1 - 1e-4 per step: multiplying a bf16 weight in place (torch-optimi's way) rounds it
    back every time; here it is part of the update and Kahan summation keeps it."""
    w = torch.full((64,), 1.5, dtype=torch.bfloat16, requires_grad=True)
    opt = LowPrecisionWeightAdamW(
        [w], lr=1e-3, weight_decay=0.1, weight_update=WeightUpdate("kahan", seed=0, names={w: "w"})
    )
    for _ in range(300):
        w.grad = torch.zeros_like(w)
        opt.step()
    expected = 1.5 * (1 - 1e-4) ** 300
    assert float((w.float() - expected).abs().max()) <= 2.0**-7
    in_place = torch.full((64,), 1.5, dtype=torch.bfloat16)
    for _ in range(300):
        in_place.mul_(1 - 1e-4)
    assert torch.equal(in_place.float(), torch.full((64,), 1.5))


# -- every optimizer on bf16 weights: the fp32 step, rounded ---------------------------------------------------------

METHODS = {
    "full": [],
    "galore": ["method.rank=4", "method.update_proj_gap=2"],
    "galore_ef": ["method.rank=4"],
    "galore_8bit": ["method.rank=4"],
    "galore_adafactor": ["method.rank=4"],
    "adam_mini": [],
    "apollo": ["method.rank=4"],
    "fira": ["method.rank=4"],
    "relora": ["method.rank=4"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_optimizer_on_bf16_weights_takes_its_fp32_step_rounded(method: str, quickstart_data, tmp_path) -> None:
    """A step of the method's optimizer from the same bf16-valued weights and gradients: on fp32 weights (the
    master's step) and on bf16 weights with ``weight_update=nearest``. The bf16 weights are the fp32 ones rounded
    (within a bf16 step where the fp32 result sits on a rounding boundary), and they did move. (One step: after it
    the two runs hold different weights, by the rounding.)"""
    overrides = [f"method.name={method}", *METHODS[method], "optim.weight_decay=0.1", "optim.warmup_steps=0"]
    master = Trainer(tiny(quickstart_data, tmp_path / "fp32", *overrides, "train.dtype=bf16"))
    low = Trainer(
        tiny(quickstart_data, tmp_path / "bf16", *overrides, "train.param_dtype=bf16", "optim.weight_update=nearest")
    )
    low_params = dict(low.raw_model.named_parameters())
    with torch.no_grad():
        for name, p in master.raw_model.named_parameters():
            assert low_params[name].dtype == torch.bfloat16, name
            p.copy_(low_params[name].float())  # the same starting values
    start = {n: p.detach().float().clone() for n, p in master.raw_model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for name, p in master.raw_model.named_parameters():
        if p.requires_grad:
            grad = (torch.randn(p.shape, generator=gen) * 0.01).bfloat16()
            p.grad, low_params[name].grad = grad.float(), grad.clone()
    master.optimizer.step()
    low.optimizer.step()
    moved = 0
    for name, p in master.raw_model.named_parameters():
        ours = low_params[name].float()
        exponent = torch.frexp(p.detach())[1]  # |p| = m * 2^e, m in [0.5, 1): a bf16 step there is 2^(e - 8)
        ulp = torch.ldexp(torch.ones_like(p.detach()), exponent - 8)
        # The fp32 steps of the two runs differ in their last bits (the rounded run computes the step apart from the
        # weight, and AdamW in torch-optimi's form): a weight whose fp32 result lies near a rounding boundary may
        # round the other way, and one whose result nearly cancels (a bf16 step far below the update's) a little
        # further.
        assert bool(((ours - p).abs() <= 2 * ulp + 1e-3 * 3e-3).all()), name
        assert float((ours == p.bfloat16().float()).float().mean()) > 0.99, name
        moved += int(not torch.equal(ours, start[name]))
    assert moved >= 4
    master.close()
    low.close()


# -- training and resuming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stochastic", "kahan", "nearest"])
def test_bf16_weights_train_and_resume_bit_identically(mode: str, quickstart_data: Path, tmp_path: Path) -> None:
    """Every weight and gradient in bf16 (no fp32 parameter anywhere), the optimizer state of the rule (a count of
    rounded updates; a bf16 compensation buffer per weight) in the checkpoint, and a resumed run bit-identical."""
    extra = ["train.param_dtype=bf16", f"optim.weight_update={mode}", "train.steps=6", "checkpoint.interval=100"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "whole", *extra))
    assert {p.dtype for p in whole.raw_model.parameters()} == {torch.bfloat16}
    losses = whole.train().train_losses
    assert losses[-1] < losses[0]
    state = next(iter(whole.optimizer.state.values()))
    key = {"stochastic": "rounds", "kahan": "kahan_comp", "nearest": None}[mode]
    assert key is None or key in state
    if key == "rounds":
        assert int(state["rounds"]) == 6
    cut = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra))
    for _ in range(3):
        cut.train_step()
    cut.save_checkpoint()
    cut.close()
    resumed = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra))
    assert resumed.train().train_losses == losses[3:]
    final = dict(resumed.raw_model.named_parameters())
    for name, value in whole.raw_model.named_parameters():
        assert torch.equal(final[name], value), name


def test_stochastic_rounding_trains_like_the_fp32_master(quickstart_data: Path, tmp_path: Path) -> None:
    """12 steps of the quickstart: bf16 weights with stochastic rounding end within 2% of the fp32 master's loss."""
    extra = ["train.steps=12", "train.dtype=bf16", "optim.lr=1e-2"]
    master = Trainer(tiny(quickstart_data, tmp_path / "fp32", *extra)).train().train_losses
    low = Trainer(tiny(quickstart_data, tmp_path / "bf16", *extra, "train.param_dtype=bf16")).train().train_losses
    assert abs(low[-1] - master[-1]) <= 0.02 * master[-1]


# -- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.dtype=fp32"], "set train.dtype=bf16 (or auto)"),
        (["parallel.backend=deepspeed"], "parallel.backend=deepspeed"),
        (["method.name=relora", "method.warm_start_steps=3"], "method.warm_start_steps"),
        (["optim.weight_update=round"], "optim.weight_update"),
    ],
)
def test_settings_bf16_weights_cannot_run_with_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run_dir=r", "data.path=d", "train.param_dtype=bf16", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_weight_update_with_fp32_weights_is_ignored_with_one_log_line(quickstart_data, tmp_path, caplog) -> None:
    with caplog.at_level("INFO", logger="megatron_pept"):
        trainer = Trainer(tiny(quickstart_data, tmp_path / "r", "optim.weight_update=kahan"))
    assert trainer.weight_update is None and isinstance(trainer.optimizer, torch.optim.AdamW)
    assert sum("optim.weight_update=kahan is ignored" in r.getMessage() for r in caplog.records) == 1
    trainer.close()


def test_a_resume_that_changes_the_weights_dtype_or_rounding_is_refused(quickstart_data: Path, tmp_path: Path) -> None:
    """The optimizer state of bf16 weights belongs to its rule (a count, or a compensation buffer), and an fp32
    run's to fp32 weights: a resume that changes either is refused in one line, before anything is loaded."""
    from megatron_pept.errors import UserError

    run = tmp_path / "run"
    Trainer(tiny(quickstart_data, run, "train.param_dtype=bf16", "train.steps=2", "checkpoint.interval=2")).train()
    for changed, message in (
        (["optim.weight_update=kahan"], "optim.weight_update='stochastic' (this run: 'kahan')"),
        (["train.param_dtype=fp32"], "train.param_dtype='bf16' (this run: 'fp32')"),
    ):
        with pytest.raises(UserError) as err:
            Trainer(tiny(quickstart_data, run, "train.param_dtype=bf16", "train.steps=4", *changed))
        assert message in str(err.value) and "\n" not in str(err.value)
    resumed = Trainer(tiny(quickstart_data, run, "train.param_dtype=bf16", "train.steps=4", "optim.weight_update=auto"))
    assert resumed.state.step == 2  # auto is stochastic: the same rule
    resumed.close()


def test_q_galore_rounds_its_bf16_weights_by_the_rule_and_keeps_its_quantisation_fp32(quickstart_data, tmp_path):
    """Q-GaLore's weights that are not int8 (embedding, norms, LM head) are bf16 and stepped through the rule (each
    holds its Kahan buffer); its int8 layers keep uint8 codes and fp32 scales (a bf16 scale would move every
    dequantised weight of its group)."""
    extra = ["method.name=q_galore", "method.weight_group_size=16", "method.proj_group_size=32", "train.steps=3"]
    trainer = Trainer(
        tiny(quickstart_data, tmp_path / "r", *extra, "train.param_dtype=bf16", "optim.weight_update=kahan")
    )
    losses = trainer.train().train_losses
    assert losses[-1] < losses[0]
    stepped = [(n, p) for n, p in trainer.raw_model.named_parameters() if p.requires_grad]
    assert stepped and all(p.dtype == torch.bfloat16 for _, p in stepped)
    assert all("kahan_comp" in trainer.optimizer.state[p] for _, p in stepped)
    held = dict(trainer.raw_model.named_parameters())
    scales = [n for n in held if n.endswith(".weight_scales")]
    assert scales and all(held[n].dtype == torch.float32 for n in scales)
    assert all(held[n.removesuffix("_scales")].dtype == torch.uint8 for n in scales)
    trainer.close()
