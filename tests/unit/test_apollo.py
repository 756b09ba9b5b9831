"""APOLLO, APOLLO-Mini and Fira against their reference packages (apollo-torch, fira), and exact invariants: the
random projection is a function of (name seed, refresh count), APOLLO-Mini's state is O(max dim) per matrix, a
resumed run equals an uninterrupted one, per-layer updates equal the global step."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from test_galore import batches, debug_model, max_diff, method_optimizer, train_steps
from test_trainer import tiny

from megatron_pept.config import MethodConfig, OptimConfig
from megatron_pept.errors import ConfigError
from megatron_pept.methods import build_method, ignored_keys
from megatron_pept.optim.projector import name_seed, projection_seed, random_projection
from megatron_pept.optim.scaling import limit_norm_growth, scaling_factor
from megatron_pept.registry import load_config
from megatron_pept.trainer import Trainer

APOLLO_CASES = {  # method -> (our method.* settings, apollo-torch's group settings)
    "apollo": ({"rank": 4, "apollo_scale": 2.0}, {"rank": 4, "scale_type": "channel", "scale": 2.0}),
    "apollo_mini": ({}, {"rank": 1, "scale_type": "tensor", "scale": 128}),  # the method's defaults
}


def projected(opt) -> list[tuple[dict, torch.Tensor]]:
    return [(g, p) for g in opt.param_groups if "rank" in g for p in g["params"]]


# -- the random projection --------------------------------------------------------------------------------------


def train_both_bit_for_bit(ours_model, ours, ref_model, ref) -> list[int]:
    """12 steps (refreshes at steps 0, 5 and 10) of ours and the reference on the same batches; every weight
    equal bit for bit, and the model trained. Returns the number of limited matrices at each of our steps."""
    data = batches(12)
    limited = []
    for ids in data:
        train_steps(ours_model, ours, [ids])
        limited.append(int(ours.step_stats()["limited_matrices"]))
    train_steps(ref_model, ref, data)
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
    assert max_diff(ours_model, debug_model()) > 1e-2  # it trained
    return limited


@pytest.mark.parametrize("side,shape", [("right", (48, 16)), ("left", (16, 48))])
def test_random_projection_is_apollo_torchs_draw(side: str, shape: tuple[int, int]) -> None:
    """Given the same integer seed our projector is the package's, bit for bit (same generator calls)."""
    random_projector = pytest.importorskip("apollo_torch.random_projector")
    ref = random_projector.GradientProjector(rank=3, seed=0)
    for seed in (0, 1, 123_456_789, projection_seed(name_seed("model.layers.0.mlp.up_proj.weight"), 2)):
        theirs = ref.get_orthogonal_matrix(torch.zeros(shape), 3, type=side, seed=seed)
        ours = random_projection(shape, rank=3, side=side, seed=seed)
        assert torch.equal(ours, theirs)
        assert ours.shape == ((3, shape[1]) if side == "right" else (shape[0], 3))


def test_projection_seeds_come_from_the_name_and_the_refresh_count() -> None:
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert name_seed(a) == name_seed(a) != name_seed(b)
    assert name_seed(a, base_seed=1) != name_seed(a)
    assert 0 <= name_seed(a) < 2**63 and 0 <= projection_seed(name_seed(a), 7) < 2**63
    seeds = {projection_seed(name_seed(n), k) for n in (a, b) for k in range(4)}
    assert len(seeds) == 8  # every (parameter, refresh) draws its own matrix
    draw = random_projection((32, 16), rank=4, side="right", seed=projection_seed(name_seed(a), 3))
    assert torch.equal(draw, random_projection((32, 16), rank=4, side="right", seed=projection_seed(name_seed(a), 3)))


def test_the_optimizer_holds_the_projection_its_seed_and_refresh_count_say() -> None:
    model = debug_model()
    _, opt = method_optimizer("apollo", model, rank=4, update_proj_gap=3)
    names = {p: n for n, p in model.named_parameters()}
    seen: dict[tuple[str, int], torch.Tensor] = {}
    for ids in batches(7):  # refreshes at steps 0, 3 and 6
        train_steps(model, opt, [ids])
        for _, p in projected(opt):
            state = opt.state[p]
            assert int(state["seed"]) == name_seed(names[p], base_seed=0)
            refresh = int(state["refreshes"]) - 1
            (held_key, held) = opt._random_bases[p]
            assert held_key == (int(state["seed"]), refresh)
            side = "right" if p.shape[0] >= p.shape[1] else "left"
            again = random_projection(tuple(p.shape), rank=4, side=side, seed=projection_seed(*held_key))
            assert torch.equal(held, again)
            seen[(names[p], refresh)] = held
            assert "projector" not in state  # regenerated, not stored
    assert {k for _, k in seen} == {0, 1, 2}
    layer0 = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(seen[(layer0, 0)], seen[(layer0, 1)])  # a refresh draws a new matrix
    assert not torch.equal(seen[(layer0, 0)], seen[("model.layers.1.mlp.up_proj.weight", 0)])  # so does a parameter


def test_seeds_do_not_depend_on_the_parameter_order() -> None:
    """The same parameter gets the same projections whatever its place in the optimizer (reordered groups here;
    per-layer optimizers, shards on other ranks): the seed comes from its name."""
    forward, backward = debug_model(), debug_model()
    method, opt_f = method_optimizer("apollo_mini", forward)
    groups = [{**g, "params": list(reversed(g["params"]))} for g in reversed(method.param_groups(backward))]
    names = {p: n for n, p in backward.named_parameters()}
    opt_b = type(opt_f)(groups, lr=1e-2, eps=1e-6, weight_decay=0.01, param_names=names)
    data = batches(3)
    train_steps(forward, opt_f, data)
    train_steps(backward, opt_b, data)
    assert max_diff(forward, backward) == 0.0
    with pytest.raises(ValueError, match="pass param_names="):
        type(opt_f)(groups, lr=1e-2)


# -- against the reference packages ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(APOLLO_CASES))
def test_apollo_equals_apollo_torch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """apollo-torch's ``APOLLOAdamW`` draws its projections with the same generator calls as ours
    (:func:`test_random_projection_is_apollo_torchs_draw`) but seeds them differently: the parameter's 1-based
    index for the first draw, then ``next_seed`` (16 draws of a generator) per refresh. We seed from the name and
    the refresh count instead (stable under sharding), so here the package is given our seeds: its first seed is
    set to ours for refresh 0 and its ``next_seed`` maps our seed of refresh k to ours of refresh k + 1. The rest
    is the package's own arithmetic; with the same matrices the two agree bit for bit (same operations in the same
    order: scaling factor, limiter, scale, step size, weight decay)."""
    apollo_torch = pytest.importorskip("apollo_torch")
    ours_kw, ref_kw = APOLLO_CASES[name]
    ours_model, ref_model = debug_model(), debug_model()
    method, ours = method_optimizer(name, ours_model, update_proj_gap=5, **ours_kw)
    names = {p: n for n, p in ref_model.named_parameters()}
    ref_groups = []
    for group in method.param_groups(ref_model):
        ref = {"params": group["params"], "weight_decay": group["weight_decay"]}
        if "rank" in group:
            ref.update(proj="random", update_proj_gap=5, proj_type="std", **ref_kw)
        ref_groups.append(ref)
    ref = apollo_torch.APOLLOAdamW(ref_groups, lr=1e-2, eps=1e-6, weight_decay=0.01)
    following = {}
    for group in ref.param_groups:
        for p in group["params"] if "rank" in group else []:
            seed = name_seed(names[p], base_seed=0)
            ref.state[p]["seed"] = projection_seed(seed, 0)
            following.update({projection_seed(seed, k): projection_seed(seed, k + 1) for k in range(4)})
    monkeypatch.setattr(apollo_torch.random_projector, "next_seed", lambda seed: following[seed])
    limited = train_both_bit_for_bit(ours_model, ours, ref_model, ref)
    assert any(limited) and limited[0] == 0  # the limiter acted (never on the first step: nothing to compare)
    assert ours.param_groups[-1]["scale"] == math.sqrt(ref_kw["scale"])


def test_fira_equals_the_fira_package() -> None:
    """fira's ``FiraAdamW`` with GaLore's full-SVD projector: bit for bit, GaLore's alpha 0.25 included (the
    package scales the projected-back gradient by alpha in the residual too, and so do we)."""
    fira = pytest.importorskip("fira")
    ours_model, ref_model = debug_model(), debug_model()
    method, ours = method_optimizer("fira", ours_model, rank=4, update_proj_gap=5, galore_scale=0.25)
    ref_groups = []
    for group in method.param_groups(ref_model):
        ref = {"params": group["params"], "weight_decay": group["weight_decay"]}
        if "rank" in group:
            ref.update(rank=4, update_proj_gap=5, alpha=0.25, proj_type="std")
        ref_groups.append(ref)
    ref = fira.FiraAdamW(ref_groups, lr=1e-2, eps=1e-6, weight_decay=0.01, no_deprecation_warning=True)
    limited = train_both_bit_for_bit(ours_model, ours, ref_model, ref)
    assert any(limited)


def test_scaling_factor_and_limiter() -> None:
    gen = torch.Generator().manual_seed(0)
    update, grad = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    right = scaling_factor(update, grad, side="right", scale_type="channel")
    assert right.shape == (6, 1)
    torch.testing.assert_close(right[2, 0], update[2].norm() / (grad[2].norm() + 1e-8))
    left = scaling_factor(update.T, grad.T, side="left", scale_type="channel")
    assert torch.equal(left, right[:, 0])
    whole = scaling_factor(update, grad, side="right", scale_type="tensor")
    assert whole.shape == () and torch.equal(whole, update.norm() / (grad.norm() + 1e-8))
    x = torch.full((4,), 1.0)  # norm 2
    same, norm, hit = limit_norm_growth(x, torch.tensor(2.0), gamma=1.01)
    assert torch.equal(same, x) and float(norm) == 2.0 and not bool(hit)
    grown, norm, hit = limit_norm_growth(3 * x, torch.tensor(2.0), gamma=1.01)
    assert bool(hit) and float(norm) == pytest.approx(2.02) and float(grown.norm()) == pytest.approx(2.02)


# -- memory --------------------------------------------------------------------------------------------------------


def state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


@pytest.mark.parametrize("name,rank", [("apollo_mini", 1), ("apollo", 8)])
def test_apollo_state_is_rank_times_the_larger_side(name: str, rank: int) -> None:
    model, adam_model = debug_model(), debug_model()
    _, opt = method_optimizer(name, model, **({"rank": rank} if name == "apollo" else {}))
    adam = torch.optim.AdamW(adam_model.parameters(), lr=1e-2)
    data = batches(2)
    train_steps(model, opt, data)
    train_steps(adam_model, adam, data)
    ours_total = adam_total = 0
    adam_state = {n: adam.state[p] for n, p in adam_model.named_parameters()}
    for pname, p in model.named_parameters():
        if not any(p is q for _, q in projected(opt)):
            continue
        ours, theirs = state_bytes(opt.state[p]), state_bytes(adam_state[pname])
        moments = 2 * rank * max(p.shape) * 4  # exp_avg and exp_avg_sq, fp32
        assert ours == moments + 4 + 8 + 8 + 4, pname  # + step (fp32), refreshes, seed (int64), limiter norm (fp32)
        assert theirs == 2 * p.numel() * 4 + 4  # AdamW: two full moments and its step
        ours_total, adam_total = ours_total + ours, adam_total + theirs
        # The projection itself is kept in memory, not in the state (redrawn after a load): r x the smaller side.
        assert opt._random_bases[p][1].numel() == rank * min(p.shape)
    # The debug model's 14 matrices (32 x 64 ... 176 x 64): measured 1/57 of AdamW's bytes at rank 1, 1/7 at rank 8.
    assert ours_total / adam_total < {1: 0.02, 8: 0.14}[rank]


# -- the method: config, scalars, backends ---------------------------------------------------------------------------


def test_method_settings_and_scalars() -> None:
    mini = build_method(MethodConfig(name="apollo_mini", rank=8), optim_cfg=OptimConfig(), total_steps=10)
    assert ignored_keys(MethodConfig(name="apollo_mini", rank=8)) == {"rank": 8}  # APOLLO-Mini is rank 1 by definition
    opt = mini.build_optimizer(debug_model())
    group = opt.param_groups[-1]
    settings = (group["rank"], group["scale_type"], group["projector"], group["update_rule"])
    assert settings == (1, "tensor", "random", "apollo")
    assert group["scale"] == math.sqrt(128) and group["norm_growth_limit"] == 1.01
    apollo = build_method(MethodConfig(name="apollo"), optim_cfg=OptimConfig(), total_steps=10)
    assert apollo.projected_settings()["scale"] == 1.0 and apollo.projected_settings()["rank"] == 128
    fira = build_method(MethodConfig(name="fira", norm_growth_limit=0), optim_cfg=OptimConfig(), total_steps=10)
    fira_group = fira.build_optimizer(debug_model()).param_groups[-1]
    assert (fira_group["norm_growth_limit"], fira_group["projector"], fira_group["update_rule"]) == (0, "svd", "fira")
    model = debug_model()
    method, opt = method_optimizer("fira", model, rank=4)
    ends = []
    for step, ids in enumerate(batches(3)):
        train_steps(model, opt, [ids])
        ends.append(method.on_step_end(step=step, model=model, optimizer=opt).scalars)
    assert ends[0]["galore/limited_fraction"] == 0.0 and ends[0]["galore/scaling_factor"] > 0
    assert ends[-1]["galore/limiter_activations"] == method.limiter_activations
    assert int(method.state_dict()["limiter_activations"]) == method.limiter_activations


def test_every_backend_is_accepted_and_bad_settings_are_refused() -> None:
    """The three run on every backend (tests/distributed compare each with one process)."""
    backends = [["parallel.backend=ddp"], ["parallel.backend=fsdp2"]]
    backends += [["parallel.backend=deepspeed", f"parallel.zero_stage={stage}"] for stage in (1, 2, 3)]
    for name in ("apollo", "apollo_mini", "fira"):
        for backend in backends:
            assert load_config(None, ["data.path=/d", f"method.name={name}", *backend]).method.name == name
    with pytest.raises(ConfigError, match="norm_growth_limit must be > 1"):
        load_config(None, ["data.path=/d", "method.name=fira", "method.norm_growth_limit=0.5"])
    with pytest.raises(ConfigError, match="apollo_scale must be > 0"):
        load_config(None, ["data.path=/d", "method.name=apollo", "method.apollo_scale=0"])


# -- through the trainer ---------------------------------------------------------------------------------------------

SETTINGS = {
    "apollo": ["method.name=apollo", "method.rank=4"],
    "apollo_mini": ["method.name=apollo_mini"],
    "fira": ["method.name=fira", "method.rank=4"],
}
SHORT = ["train.eval_interval=0", "train.eval_at_start=false", "method.update_proj_gap=2", "train.max_grad_norm=0"]


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per-layer"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_resume_is_bit_identical(name: str, per_layer: bool, quickstart_data: Path, tmp_path: Path) -> None:
    """Saved after step 3 (mid-gap: refreshes at 0, 2, 4), resumed in a new trainer: the losses and weights of an
    uninterrupted run. The random projections are redrawn from the saved seeds and refresh counts."""
    extra = [*SETTINGS[name], *SHORT, "train.steps=5", f"optim.per_layer={str(per_layer).lower()}"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "whole", *extra))
    losses = whole.train().train_losses
    cut = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra, "checkpoint.interval=100"))
    for _ in range(3):
        cut.train_step()
    cut.save_checkpoint()
    cut.close()
    resumed = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra, "checkpoint.interval=100"))
    assert resumed.state.step == 3
    assert resumed.train().train_losses == losses[3:]
    final = dict(resumed.raw_model.named_parameters())
    for pname, value in whole.raw_model.named_parameters():
        assert torch.equal(final[pname], value), pname
    whole.close()
    resumed.close()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_optimizer_state_dict_loads_weights_only(name: str) -> None:
    data = batches(8)
    reference = debug_model()
    _, opt = method_optimizer(name, reference, rank=4, update_proj_gap=3)
    train_steps(reference, opt, data)
    first = debug_model()
    _, opt1 = method_optimizer(name, first, rank=4, update_proj_gap=3)
    train_steps(first, opt1, data[:4])  # mid-gap
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and plain numbers only
    keys = {k for state in saved["optim"]["state"].values() for k in state}
    assert {"seed", "refreshes", "limiter_norm", "exp_avg", "exp_avg_sq"} <= keys
    assert ("projector" in keys) == (name == "fira")  # APOLLO's projection is redrawn, Fira's SVD basis kept
    resumed = debug_model(seed=123)
    _, opt2 = method_optimizer(name, resumed, rank=4, update_proj_gap=3)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    train_steps(resumed, opt2, data[4:])
    assert max_diff(resumed, reference) == 0.0


@pytest.mark.parametrize("micro", [8, 4], ids=["no-accumulation", "accumulation"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_per_layer_equals_global_step(name: str, micro: int, quickstart_data: Path, tmp_path: Path) -> None:
    extra = [*SETTINGS[name], *SHORT, "train.steps=4", "train.global_batch_size=8", f"train.micro_batch_size={micro}"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "g", *extra))
    layered = Trainer(tiny(quickstart_data, tmp_path / "p", *extra, "optim.per_layer=true"))
    assert whole.train().train_losses == layered.train().train_losses
    for (pname, a), b in zip(whole.model.named_parameters(), layered.model.parameters()):
        assert torch.equal(a, b), pname
    whole.close()
    layered.close()
