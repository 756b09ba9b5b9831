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
from megatron_pept.sharding import FlatFragment, optimizer_protocol
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


def test_a_fragment_of_a_weight_gets_the_bits_the_whole_weight_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ZeRO fragment (a piece of a weight's row-major flattening, cut anywhere: inside a row, inside a seeded
    block) is rounded exactly as those elements are when the whole weight is rounded."""
    monkeypatch.setattr(seeded, "BLOCK_NUMEL", 3 * 16)
    gen = torch.Generator().manual_seed(5)
    for shape in ((23, 16), (40,)):
        w = torch.randn(shape, generator=gen).bfloat16()
        delta = torch.randn(shape, generator=gen) * 1e-3
        update = WeightUpdate("stochastic", seed=3, names={w: "w"})
        whole = w.clone()
        update.add_(w, whole, {}, delta)
        numel = w.numel()
        for cuts in ([0, 7, numel // 2 + 3, numel], [0, 0, 17, 29, numel - 1, numel]):
            for lo, hi in zip(cuts, cuts[1:]):
                frag = FlatFragment(shape, lo=lo, numel=hi - lo, offset=0)
                piece = w.flatten()[lo:hi].clone()
                update.add_(w, piece, {}, delta.flatten()[lo:hi], fragment=frag)
                assert torch.equal(piece, whole.flatten()[lo:hi]), (shape, lo, hi)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_adamw_stepping_zero_flat_partitions_equals_stepping_each_weight(mode, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed ZeRO with bf16 master weights (``bf16.bf16_master_weights_and_grads``) hands AdamW flat bf16
    partitions holding pieces of several weights; two ranks' partitions, each stepped by its own optimizer, hold
    exactly what stepping each weight whole on one process gives, step after step."""
    monkeypatch.setattr(seeded, "BLOCK_NUMEL", 3 * 16)
    gen = torch.Generator().manual_seed(6)
    shapes = [(23, 16), (40,), (7, 5)]
    weights = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in shapes]
    names = {w: f"w{i}" for i, w in enumerate(weights)}
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    whole = LowPrecisionWeightAdamW(weights, weight_update=WeightUpdate(mode, seed=2, names=names), **kw)
    total = sum(w.numel() for w in weights)
    size = -(-total // 2)  # two equal partitions, the last padded as ZeRO pads it
    full = torch.cat([w.detach().flatten() for w in weights] + [torch.zeros(2 * size - total, dtype=torch.bfloat16)])
    flats, optimizers = [], []
    for rank in range(2):
        flat = full[rank * size : (rank + 1) * size].clone().requires_grad_()
        pieces, start = [], 0
        for w in weights:
            lo, hi = max(start, rank * size), min(start + w.numel(), (rank + 1) * size)
            if lo < hi:
                pieces.append((w, FlatFragment(w.shape, lo=lo - start, numel=hi - lo, offset=lo - rank * size)))
            start += w.numel()
        opt = LowPrecisionWeightAdamW([flat], weight_update=WeightUpdate(mode, seed=2, names=names), **kw)
        opt.attach_zero({id(flat): pieces})
        flats.append(flat)
        optimizers.append(opt)
    assert any(0 < f.numel < f.shape.numel() for f in (frag for _, frag in pieces))  # a weight is cut in two
    for _ in range(6):
        grads = [torch.randn(w.shape, generator=gen).bfloat16() for w in weights]
        for w, g in zip(weights, grads):
            w.grad = g
        whole.step()
        flat_grad = torch.cat([g.flatten() for g in grads] + [torch.zeros(2 * size - total, dtype=torch.bfloat16)])
        for rank, (flat, opt) in enumerate(zip(flats, optimizers)):
            flat.grad = flat_grad[rank * size : (rank + 1) * size].clone()
            opt.step()
        joined = torch.cat([f.detach() for f in flats])[:total]
        assert torch.equal(joined, torch.cat([w.detach().flatten() for w in weights]))


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

FP32_PROJECTOR = "method.projector_dtype=fp32"  # the master's projector (auto holds bf16 weights' in bf16)
METHODS = {
    "full": [],
    "galore": ["method.rank=4", "method.update_proj_gap=2", FP32_PROJECTOR],
    "galore_ef": ["method.rank=4", FP32_PROJECTOR],
    "galore_8bit": ["method.rank=4", FP32_PROJECTOR],
    "galore_adafactor": ["method.rank=4", FP32_PROJECTOR],
    "adam_mini": [],
    "apollo": ["method.rank=4"],
    "fira": ["method.rank=4", FP32_PROJECTOR],
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


def test_bf16_weights_hold_a_bf16_projector_used_upcast(quickstart_data, tmp_path) -> None:
    """method.projector_dtype=auto with bf16 weights holds the projector in bf16 (as galore-torch does, in its bf16
    gradient's dtype); fp32 keeps it fp32."""
    overrides = ["method.name=galore", "method.rank=4", "optim.weight_update=nearest"]
    held = {}
    for dtype in ("auto", "fp32"):
        run = Trainer(
            tiny(
                quickstart_data,
                tmp_path / dtype,
                *overrides,
                "train.param_dtype=bf16",
                f"method.projector_dtype={dtype}",
            )
        )
        params = [p for p in run.raw_model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(3)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.01).bfloat16()
        run.optimizer.step()  # the first step makes the projectors
        held[dtype] = run
    auto, fp32 = held["auto"].optimizer, held["fp32"].optimizer
    projectors = [(p, s["projector"]) for p, s in auto.state.items() if "projector" in s]
    assert projectors and all(t.dtype == torch.bfloat16 for _, t in projectors)
    assert all(s["projector"].dtype == torch.float32 for s in fp32.state.values() if "projector" in s)
    for run in held.values():
        run.close()


def as_one_zero_rank(optimizer) -> None:
    """Hand ``optimizer`` its parameters as DeepSpeed ZeRO does on one rank: each group's weights concatenated into
    one flat bf16 partition, the weights' pieces in it given by a layout (:func:`zero_layout`'s form)."""
    layout = {}
    for group in optimizer.param_groups:
        flat = torch.cat([p.detach().flatten() for p in group["params"]]).requires_grad_()
        pieces, offset = [], 0
        for p in group["params"]:
            pieces.append((p, FlatFragment(p.shape, lo=0, numel=p.numel(), offset=offset)))
            offset += p.numel()
        group["params"] = [flat]
        layout[id(flat)] = pieces
    optimizer_protocol(optimizer).attach_zero(layout)
    return layout


SUMMED_IN_ANOTHER_ORDER = {"galore_adafactor", "adam_mini"}
"""Their ZeRO path sums per-row and per-head statistics by index (over fragments) where the whole-weight path takes
a mean: the fp32 results differ in a last bit, which moves about 0.03% of the bf16 weights by one bf16 step."""


@pytest.mark.parametrize("method", ["full", "galore", "galore_adafactor", "adam_mini", "apollo"])
def test_each_optimizer_steps_zero_partitions_of_bf16_weights_as_whole_weights(method, quickstart_data, tmp_path):
    """The ZeRO path of each optimizer over bf16 weights (AdamW on the flat partition; GaLore, its Adafactor, APOLLO
    and Adam-mini on each weight's fragment, projected and unprojected weights alike) rounds by the rule with each
    weight's own bits: two stochastic-rounding steps equal the whole-weight steps bit for bit (but for the last-bit
    differences of :data:`SUMMED_IN_ANOTHER_ORDER`), and every weight's rounding count is 2."""
    overrides = [f"method.name={method}", *METHODS.get(method, []), "optim.weight_decay=0.1", "optim.warmup_steps=0"]
    overrides += ["train.param_dtype=bf16", "optim.weight_update=stochastic"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "whole", *overrides))
    zero = Trainer(tiny(quickstart_data, tmp_path / "zero", *overrides))
    layout = as_one_zero_rank(zero.optimizer)
    flats = {id(f): f for g in zero.optimizer.param_groups for f in g["params"]}
    zero_params = dict(zero.raw_model.named_parameters())
    twin = {id(zero_params[n]): p for n, p in whole.raw_model.named_parameters()}  # zero's weight -> whole's
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        for p in twin.values():
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.01).bfloat16()
        for key, pieces in layout.items():
            flats[key].grad = torch.cat([twin[id(q)].grad.flatten() for q, _ in pieces])
        whole.optimizer.step()
        zero.optimizer.step()
    for key, pieces in layout.items():
        for q, frag in pieces:
            ours, theirs = frag.view(flats[key].detach()).float(), twin[id(q)].detach().flatten().float()
            if method in SUMMED_IN_ANOTHER_ORDER:
                same = float((ours == theirs).float().mean())
                ulp = torch.ldexp(torch.ones_like(theirs), torch.frexp(torch.maximum(ours.abs(), theirs.abs()))[1] - 8)
                # one bf16 step, or a last fp32 bit of the update where it nearly cancels the weight (measured 7e-9)
                near = bool(((ours - theirs).abs() <= ulp + 1e-7).all())
                assert same > 0.999 and near, (method, tuple(q.shape), same)
            else:
                assert torch.equal(ours, theirs), (method, tuple(q.shape))
            state = zero.optimizer.state[flats[key] if method == "full" else q]
            assert int(state["rounds"]) == 2, (method, tuple(q.shape))  # every weight went through the rule
    whole.close()
    zero.close()


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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_weights_computed_in_fp32_are_the_fp32_model_with_gradients_rounded(method, quickstart_data, tmp_path):
    """``train.dtype=fp32`` over bf16 weights (for CPUs without bf16 matmul): each module computes with its weights
    upcast, so the loss is exactly that of an fp32 model holding the same values, each gradient is that model's
    rounded to bf16 once, and the weights stay bf16 parameters (the upcast copies are gone after the forward)."""
    extra = [f"method.name={method}", "method.rank=8", "train.dtype=fp32", "train.activation_checkpointing=true"]
    low = Trainer(tiny(quickstart_data, tmp_path / "bf16", *extra, "train.param_dtype=bf16"))
    high = Trainer(tiny(quickstart_data, tmp_path / "fp32", *extra))
    low_params = dict(low.raw_model.named_parameters())
    with torch.no_grad():
        for name, p in high.raw_model.named_parameters():
            p.copy_(low_params[name].float())
    ids = torch.randint(0, low.model_args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for trainer in (low, high):
        logits = trainer.raw_model(ids)
        assert logits.dtype == torch.float32
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for name, p in high.raw_model.named_parameters():
        ours = low_params[name]
        assert isinstance(ours, torch.nn.Parameter) and ours.dtype == torch.bfloat16, name
        assert (p.grad is None) == (ours.grad is None), name
        if p.grad is not None:
            assert ours.grad.dtype == torch.bfloat16 and torch.equal(ours.grad, p.grad.bfloat16()), name
    low.close()
    high.close()


# -- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.dtype=fp32", "parallel.backend=deepspeed"], "DeepSpeed's bf16 mode computes in bf16"),
        (["method.name=relora", "method.warm_start_steps=3"], "method.warm_start_steps"),
        (["optim.weight_update=round"], "optim.weight_update"),
    ],
)
def test_settings_bf16_weights_cannot_run_with_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run_dir=r", "data.path=d", "train.param_dtype=bf16", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_holds_bf16_weights_in_its_bf16_master_mode() -> None:
    """Under DeepSpeed, bf16 weights are its own bf16 weights without an fp32 master; fp32 weights keep today's
    config (tests/distributed/test_bf16_weights.py runs it on ZeRO-1/2/3)."""
    from megatron_pept.distributed.deepspeed_backend import deepspeed_config

    over = ["run_dir=r", "data.path=d", "parallel.backend=deepspeed"]
    cfg = load_config(None, [*over, "train.param_dtype=bf16"])
    ds = deepspeed_config(cfg, grad_accum_steps=1, world_size=2, cuda=False)
    assert ds["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    assert "bf16" not in deepspeed_config(load_config(None, over), grad_accum_steps=1, world_size=2, cuda=False)


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
