"""The ReLoRA family: restarts preserve the function, pruning zeroes the configured share, the jagged schedule,
and LoRA / DoRA / PiSSA agree with peft on the same weights."""

from __future__ import annotations

import copy
from types import ModuleType

import pytest
import torch
from param_counts import lowrank_trainable

from megatron_pept.config import MethodConfig, ModelConfig, OptimConfig
from megatron_pept.methods import build_method
from megatron_pept.methods.lowrank import LowRankLinear
from megatron_pept.methods.relora import LowRankMethod, lowrank_layers
from megatron_pept.models import MODEL_SHAPES, build_model, llama_args
from megatron_pept.optim import build_schedule
from megatron_pept.optim.pruning import prune_random_, prune_smallest_, reset_optimizer_state


def lowrank_model(method_name: str, *, rank: int = 4, seed: int = 0, **method_kw):
    args = llama_args(ModelConfig(name="debug"), vocab_size=97, max_seq_len=32)
    cfg = MethodConfig(name=method_name, rank=rank, alpha=8.0, **method_kw)
    method = build_method(cfg, optim_cfg=OptimConfig(), total_steps=100, seed=seed)
    model = build_model(args)
    method.convert(model)
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    method.after_init(model)
    return model.eval(), method


@torch.no_grad()
def perturb_adapters(model: torch.nn.Module, *, seed: int = 1) -> None:
    """Stand-in for training: move every adapter away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lowrank_layers(model):
        for p in layer.adapter_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def assert_pissa_of(layer: LowRankLinear, w_eff: torch.Tensor) -> None:
    """``layer`` holds PiSSA's split of ``w_eff``: ``s B A`` its best rank-r approximation (top-r singular
    triplets, from an fp64 SVD here), the base the rest, and ``sqrt(S_r / s)`` on each side (``A A^T`` and
    ``B^T B`` are both ``diag(S_r / s)``; products, so the SVD's signs do not matter)."""
    u, sv, vh = torch.linalg.svd(w_eff.double(), full_matrices=False)
    r, s = layer.rank, layer.scale
    truncation = (u[:, :r] * sv[:r]) @ vh[:r]
    a, b = layer.lora_A.double(), layer.lora_B.double()
    torch.testing.assert_close(s * b @ a, truncation, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight.double(), w_eff.double() - truncation, rtol=0, atol=1e-5)
    torch.testing.assert_close(a @ a.T, torch.diag(sv[:r] / s), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.T @ b, torch.diag(sv[:r] / s), rtol=0, atol=1e-5)


def assert_qr_of(layer: LowRankLinear, w_eff: torch.Tensor, *, residual: bool) -> None:
    """``layer`` holds ReLoQRa's factors of ``w_eff = Q R``: ``B = Q_r`` (orthonormal columns), ``s A = R_r =
    Q_r^T w_eff`` (upper triangular in its first r columns, so ``B`` and ``s A[:, :r]`` are the QR of the first r
    columns of ``w_eff``); the base is ``w_eff - Q_r R_r`` with the residual, ``w_eff`` without."""
    w_eff = w_eff.double()
    r, b, qr_r = layer.rank, layer.lora_B.double(), layer.scale * layer.lora_A.double()
    torch.testing.assert_close(b.T @ b, torch.eye(r, dtype=b.dtype), rtol=0, atol=1e-5)
    assert torch.count_nonzero(torch.tril(qr_r[:, :r], diagonal=-1)) == 0
    torch.testing.assert_close(b @ qr_r[:, :r], w_eff[:, :r], rtol=0, atol=1e-5)
    torch.testing.assert_close(qr_r, b.T @ w_eff, rtol=0, atol=1e-5)
    expected_base = w_eff - b @ qr_r if residual else w_eff
    torch.testing.assert_close(layer.weight.double(), expected_base, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "method_name,kw", [("relora", {}), ("redora", {}), ("repissa", {}), ("reloqra", {"qr_residual": True})]
)
def test_merge_and_reinit_preserves_the_function(method_name: str, kw: dict) -> None:
    model, method = lowrank_model(method_name, **kw)
    perturb_adapters(model)
    ids = torch.randint(0, 97, (2, 24))
    before = model(ids)
    w_eff = {name: layer.merged_weight() for name, layer in lowrank_layers(model)}
    opt = method.build_optimizer(model)
    scalars = method._restart(model, opt)
    after = model(ids)
    assert (after - before).abs().max().item() <= 2e-5 * before.abs().max().item()
    assert scalars["relora/merged_update_norm"] > 0
    # The adapters and bases really were re-made from each layer's merged weight (not merely left in place).
    for name, layer in lowrank_layers(model):
        if method_name == "repissa":
            assert_pissa_of(layer, w_eff[name])
        elif method_name == "reloqra":
            assert_qr_of(layer, w_eff[name], residual=True)
        else:
            assert torch.count_nonzero(layer.lora_B) == 0, name
            torch.testing.assert_close(layer.weight, w_eff[name], rtol=0, atol=1e-6)
            if method_name == "redora":
                torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(w_eff[name], dim=1))


def test_reloqra_literal_adds_the_qr_factors() -> None:
    """The paper's eq. 5 taken literally: a restart adds Q_r R_r to the merged weight (the function changes)."""
    model, method = lowrank_model("reloqra")
    perturb_adapters(model)
    layer = lowrank_layers(model)[0][1]
    merged = layer.merged_weight()
    q, r = torch.linalg.qr(merged)
    method._restart(model, method.build_optimizer(model))
    expected = merged + q[:, : layer.rank] @ r[: layer.rank]
    assert torch.allclose(layer.merged_weight(), expected, atol=1e-5)
    assert torch.allclose(layer.weight.float(), merged, atol=1e-6)  # the base is the merged weight


def test_pruning_zeroes_exactly_the_configured_share() -> None:
    t = torch.randn(1000)
    smallest = t.abs().sort().values[:990]
    kept = t.clone()
    assert prune_smallest_(kept, ratio=0.99) == 990
    assert torch.count_nonzero(kept) == 10
    assert kept[kept != 0].abs().min() >= smallest.max()  # the survivors are the largest
    r = torch.randn(1000)
    assert prune_random_(r, ratio=0.3, generator=torch.Generator().manual_seed(0)) == 300
    assert torch.count_nonzero(r) == 700


@pytest.mark.parametrize(
    "mode,ratio,expected",
    [("magnitude", 0.99, 0.99), ("magnitude_joint", 0.99, 0.99), ("random", 0.5, 0.5), ("full", 0.0, 1.0)],
)
def test_restart_prunes_adapter_moments(mode: str, ratio: float, expected: float) -> None:
    model, method = lowrank_model("relora", optimizer_reset=mode, prune_ratio=ratio)
    perturb_adapters(model)  # B != 0, so every adapter entry gets a gradient and non-zero moments
    opt = method.build_optimizer(model)
    ids = torch.randint(0, 97, (2, 24))
    model(ids).square().mean().backward()
    opt.step()
    embed_state = opt.state[model.model.embed_tokens.weight]["exp_avg"].clone()
    scalars = method._restart(model, opt)
    adapters = [p for _, layer in lowrank_layers(model) for p in layer.adapter_parameters()]
    zeros = sum(int((opt.state[p][k] == 0).sum()) for p in adapters for k in ("exp_avg", "exp_avg_sq"))
    total = sum(opt.state[p][k].numel() for p in adapters for k in ("exp_avg", "exp_avg_sq"))
    assert zeros / total == pytest.approx(expected, abs=1e-3)
    assert scalars["relora/pruned_fraction"] == pytest.approx(zeros / total)
    assert torch.equal(opt.state[model.model.embed_tokens.weight]["exp_avg"], embed_state)  # full-rank untouched
    moments = {(i, k): v.clone() for i, p in enumerate(adapters) for k, v in opt.state[p].items()}
    zeroed, entries = reset_optimizer_state(opt, adapters, mode="none", ratio=0.5)
    assert zeroed == 0 and entries == total  # "none" counts every moment entry and zeroes none
    assert moments.keys() == {(i, k) for i, p in enumerate(adapters) for k in opt.state[p]}
    for (i, key), value in moments.items():
        assert torch.equal(opt.state[adapters[i]][key], value), key
    with pytest.raises(ValueError, match="unknown optimizer reset"):
        reset_optimizer_state(opt, adapters, mode="bogus", ratio=0.5)


def test_joint_pruning_never_leaves_momentum_without_scale() -> None:
    """Independent pruning keeps some first moments whose second moment it zeroed (Adam then divides by eps);
    joint pruning keeps both or neither."""
    gen = torch.Generator().manual_seed(0)
    for mode, orphans_expected in (("magnitude", True), ("magnitude_joint", False)):
        p = torch.nn.Parameter(torch.zeros(64, 64))
        opt = torch.optim.AdamW([p])
        g1, g2 = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": g1.clone(), "exp_avg_sq": g2.square()}
        zeroed, total = reset_optimizer_state(opt, [p], mode=mode, ratio=0.9)
        state = opt.state[p]
        orphans = int(((state["exp_avg"] != 0) & (state["exp_avg_sq"] == 0)).sum())
        assert (orphans > 0) == orphans_expected, mode
        assert zeroed / total == pytest.approx(0.9, abs=1e-3)
        if mode == "magnitude_joint":
            kept = state["exp_avg_sq"] != 0
            assert torch.equal(kept, state["exp_avg"] != 0)
            assert state["exp_avg_sq"][kept].min() >= g2.square()[~kept].max()  # the largest scales survive


def test_jagged_schedule_values() -> None:
    cfg = MethodConfig(name="relora", reset_every=100, warm_start_steps=50, restart_warmup_steps=10)
    method = build_method(cfg, optim_cfg=OptimConfig(), total_steps=400)
    assert method.restart_steps() == (50, 150, 250, 350)
    base = build_schedule(OptimConfig(warmup_steps=20, min_lr_ratio=0.1), total_steps=400)
    sched = method.lr_schedule(base)
    for step in (0, 10, 19, 49, 60, 149, 160, 399):
        assert sched(step) == pytest.approx(base(step))  # on the envelope outside re-warmups
    for restart in (50, 150, 250, 350):
        assert sched(restart) == 0.0
        assert sched(restart + 5) == pytest.approx(0.5 * base(restart + 10))
        assert sched(restart + 9) == pytest.approx(0.9 * base(restart + 10))
    lora = build_method(MethodConfig(name="lora", warm_start_steps=50), optim_cfg=OptimConfig(), total_steps=400)
    assert lora.restart_steps() == (50,)  # LoRA re-warms only at the warm-start switch


def _peft_twin(peft: ModuleType, model: torch.nn.Module, *, rank: int, alpha: float, **lora_kw) -> torch.nn.Module:
    """peft's LoRA over a plain copy of our model's dense weights (``peft``: the module, imported by the caller)."""
    args = model.args
    plain = build_model(args)
    plain.to_empty(device="cpu")
    plain.init_rope()
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k and "magnitude" not in k}
    plain.load_state_dict(state)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **lora_kw)
    return peft.get_peft_model(plain, config).eval()


@pytest.mark.parametrize("method_name,use_dora", [("lora", False), ("relora", False), ("redora", True)])
def test_forward_equals_peft(method_name: str, use_dora: bool) -> None:
    peft = pytest.importorskip("peft")
    model, _ = lowrank_model(method_name, rank=4)
    perturb_adapters(model)
    twin = _peft_twin(peft, model, rank=4, alpha=8.0, use_dora=use_dora)
    with torch.no_grad():
        for name, layer in lowrank_layers(model):
            peft_layer = twin.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            if use_dora:
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids), twin(ids)
    assert (ours - theirs).abs().max().item() <= 1e-5
    for _, layer in lowrank_layers(model):
        layer.lowrank_active = False
    with torch.no_grad():
        assert (ours - model(ids)).abs().max() > 1e-3  # the adapters do contribute: the check is not vacuous


def test_pissa_initialisation_equals_peft() -> None:
    peft = pytest.importorskip("peft")
    dense, _ = lowrank_model("relora", rank=4)  # any model: we only need its initial dense weights
    twin = _peft_twin(peft, dense, rank=4, alpha=8.0, init_lora_weights="pissa")
    model, _ = lowrank_model("repissa", rank=4)  # same seed: same initial weights, then PiSSA-decomposed
    for name, layer in lowrank_layers(model):
        peft_layer = twin.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_A, peft_layer.lora_A["default"].weight, atol=1e-6), name
        assert torch.allclose(layer.lora_B, peft_layer.lora_B["default"].weight, atol=1e-6), name
        assert torch.allclose(layer.weight, peft_layer.base_layer.weight, atol=1e-6), name
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert (model(ids) - dense(ids)).abs().max() <= 1e-5  # PiSSA's split keeps the function


# ReLoRA Table 2: trainable parameters of the low-rank runs (r = 128, T5 vocabulary of 32,100), in millions. They
# are rounded, so the count from the shapes is compared with them to 1% (ours: 42.9M, 71.7M, 98.9M, 125.6M, 251.1M).
@pytest.mark.parametrize("size,millions", [("60m", 43), ("130m", 72), ("250m", 99), ("350m", 125), ("1b", 250)])
def test_trainable_parameter_counts_match_relora_table_2(size: str, millions: float) -> None:
    vocab, r = 32100, 128
    expected = lowrank_trainable(vocab=vocab, rank=r, **MODEL_SHAPES[size])  # every projection: A (r x in), B
    args = llama_args(ModelConfig(name=size), vocab_size=vocab)
    method = build_method(MethodConfig(name="relora", rank=r), optim_cfg=OptimConfig(), total_steps=10)
    model = build_model(args)
    method.convert(model)
    assert sum(p.numel() for _, p in method.trainable_parameters(model)) == expected
    assert expected / 1e6 == pytest.approx(millions, rel=0.01)


def test_warm_start_switch_keeps_function_and_full_rank_moments() -> None:
    model, method = lowrank_model("relora", warm_start_steps=2)
    layers = lowrank_layers(model)
    assert not any(layer.lowrank_active for _, layer in layers)
    assert all(layer.weight.requires_grad and not layer.lora_A.requires_grad for _, layer in layers)
    opt = method.build_optimizer(model)
    ids = torch.randint(0, 97, (2, 24))
    for _ in range(2):
        model(ids).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before = model(ids)
    assert method.on_step_end(step=0, model=model, optimizer=opt).optimizer is None
    end = method.on_step_end(step=1, model=model, optimizer=opt)
    new = end.optimizer
    assert new is not None and end.scalars["relora/phase"] == 1.0
    assert (model(ids) - before).abs().max() <= 1e-6  # B = 0: the switch keeps the function
    assert all(layer.lowrank_active and not layer.weight.requires_grad for _, layer in layers)
    embed = model.model.embed_tokens.weight
    assert new.state[embed] is opt.state[embed]  # moments of parameters that still train are kept
    frozen = layers[0][1].weight
    assert frozen not in new.state and all(frozen is not p for g in new.param_groups for p in g["params"])
    state = method.state_dict()
    fresh = type(method)(method.cfg, optim_cfg=OptimConfig(), total_steps=100)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.state_dict()["phase"].item() == 1 and fresh.restart_count == 0


def test_rank_and_target_errors() -> None:
    from megatron_pept.errors import ConfigError

    with pytest.raises(ValueError, match="rank 100 must be between 1 and min"):
        LowRankLinear(64, 32, rank=100, alpha=1.0)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        lowrank_model("relora", target_modules=["nope_proj"])
    assert isinstance(build_method(MethodConfig(name="repissa"), optim_cfg=OptimConfig(), total_steps=1), LowRankMethod)


QUANT_ERROR = {"int8": 0.01, "nf4": 0.12, "fp8": 0.04}  # relative Frobenius error of one quantisation, init scale


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp8"])  # fp8: a storage format, so on this CPU too
@pytest.mark.parametrize("method_name", ["lora", "relora", "redora", "repissa", "reloqra"])
def test_a_quantised_base_merges_exactly_and_computes_within_one_quantisation(method_name: str, fmt: str) -> None:
    """The forward uses the dequantised base; a restart merges into the exact fp32 master and quantises it afresh
    (RePiSSA and ReLoQRa: the residual after their factors), so the exact merged weight is kept (to fp32 rounding)
    and the computed one is within one quantisation of it, restart after restart (no drift)."""
    kw = {"qr_residual": True} if method_name == "reloqra" else {}
    model, method = lowrank_model(method_name, base_dtype=fmt, **kw)
    reference, ref_method = lowrank_model(method_name, **kw)  # the same run with an fp32 base
    layers, ref_layers = lowrank_layers(model), dict(lowrank_layers(reference))
    for name, layer in layers:
        assert layer.weight is None and layer.base_q.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
        assert layer.base_master.dtype == torch.float32
        torch.testing.assert_close(layer.base_master, ref_layers[name].weight)  # the same exact master
        computed = layer.merged_weight(as_computed=True)
        assert float((computed - layer.merged_weight()).norm() / layer.merged_weight().norm()) < QUANT_ERROR[fmt]
    opt, ref_opt = method.build_optimizer(model), ref_method.build_optimizer(reference)
    restarts = 5 if method_name != "lora" else 0
    errors = []
    for k in range(restarts):
        perturb_adapters(model, seed=k + 1)
        perturb_adapters(reference, seed=k + 1)
        exact = {name: layer.merged_weight() for name, layer in layers}
        method._restart(model, opt)
        ref_method._restart(reference, ref_opt)
        for name, layer in layers:
            torch.testing.assert_close(layer.merged_weight(), exact[name], rtol=0, atol=2e-5)  # exact merge
            torch.testing.assert_close(layer.merged_weight(), ref_layers[name].merged_weight(), rtol=0, atol=2e-5)
            computed = layer.merged_weight(as_computed=True)
            errors.append(float((computed - exact[name]).norm() / exact[name].norm()))
    assert all(e < QUANT_ERROR[fmt] for e in errors), max(errors)


def test_quantised_bases_are_refused_where_they_cannot_run() -> None:
    from megatron_pept.errors import ConfigError
    from megatron_pept.registry import load_config

    base = ["data.path=x", "method.name=relora", "method.base_dtype=nf4"]
    with pytest.raises(ConfigError, match="warm_start_steps > 0 cannot run with parallel.backend=fsdp2"):
        load_config(None, [*base, "parallel.backend=fsdp2", "method.warm_start_steps=10"])
    with pytest.raises(ConfigError, match="cannot run with ZeRO-3"):
        load_config(None, [*base, "parallel.backend=deepspeed", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="base_master=none applies to a quantised base only"):
        load_config(None, ["data.path=x", "method.name=relora", "method.base_master=none"])
    with pytest.raises(ConfigError, match="nf4_double_quant=false applies to method.base_dtype=nf4 only"):
        load_config(
            None, ["data.path=x", "method.name=relora", "method.base_dtype=int8", "method.nf4_double_quant=false"]
        )
    for ok in (["parallel.backend=fsdp2"], ["parallel.backend=deepspeed", "parallel.zero_stage=2"]):
        load_config(None, [*base, *ok])  # accepted


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_without_a_master_the_layer_holds_only_the_quantised_base_and_merges_within_one_quantisation(fmt: str) -> None:
    """base_master=none: no fp32 copy of the base anywhere in the module (its tensors are the quantised parts and
    the adapters); a restart requantises the dequantised base plus the update, so the computed weight after it is
    within one quantisation of the merged weight before it."""
    model, method = lowrank_model("relora", base_dtype=fmt, base_master="none")
    for name, layer in lowrank_layers(model):
        assert layer.weight is None and "base_master" not in dict(layer.named_buffers())
        floats = [t for t in layer.state_dict().values() if t.is_floating_point() and t.numel() >= layer.in_features]
        assert sum(t.numel() for t in floats) < layer.in_features * layer.out_features / 4, name  # no dense copy
    opt = method.build_optimizer(model)
    for k in range(3):
        perturb_adapters(model, seed=k + 1)
        before = {name: layer.merged_weight() for name, layer in lowrank_layers(model)}
        method._restart(model, opt)
        for name, layer in lowrank_layers(model):
            after = layer.merged_weight()  # = the dequantised base now (the adapter restarts at B = 0)
            assert 0 < float((after - before[name]).norm() / before[name].norm()) < QUANT_ERROR[fmt], name


@pytest.mark.parametrize("base", ["nf4", "int8", "bf16"])
def test_a_frozen_base_stored_in_another_form_does_not_keep_its_computed_form_alive_for_backward(base: str) -> None:
    """The forward's dense fp32 base (dequantised, or cast up from bf16) is made again in backward instead of being
    saved by autograd: the tensors saved for backward hold no [out, in] matrix, and the input gradient equals the
    dense computation's."""
    torch.manual_seed(0)
    quantised = base != "bf16"
    layer = LowRankLinear(64, 48, rank=4, alpha=8, base_format=base if quantised else None)
    torch.nn.init.normal_(layer.weight, std=0.02)
    layer.decompose(generator=torch.Generator().manual_seed(0))
    if not quantised:
        layer.set_base_dtype(torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(3, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved and not [t for t in saved if tuple(t.shape) == (48, 64)]
    y.square().sum().backward()
    dense_x = x.detach().clone().requires_grad_(True)
    w = layer.base_weight().float() + layer.scale * (layer.lora_B @ layer.lora_A).detach()
    torch.nn.functional.linear(dense_x, w).square().sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad, rtol=1e-5, atol=1e-6)


def test_nf4_without_double_quantisation_keeps_fp32_block_scales_and_merges_exactly() -> None:
    """method.nf4_double_quant=false: the layer stores fp32 block absmaxes (no int8 scalers); merges still go into
    the exact master, and each block's largest weight comes back exactly (its scale is that weight), which the
    double-quantised scales do not give."""
    model, method = lowrank_model("relora", base_dtype="nf4", nf4_double_quant=False)
    double, _ = lowrank_model("relora", base_dtype="nf4")
    for (name, layer), (_, other) in zip(lowrank_layers(model), lowrank_layers(double), strict=True):
        buffers = dict(layer.named_buffers())
        assert "base_absmax" in buffers and "base_scalers" not in buffers, name
        assert buffers["base_absmax"].dtype == torch.float32
        torch.testing.assert_close(layer.base_master, other.base_master, rtol=0, atol=0)
        blocks = layer.base_master.flatten().view(-1, 64)
        top = blocks.abs().argmax(dim=1, keepdim=True)
        mine = layer.dequantized_base().flatten().view(-1, 64).gather(1, top)
        theirs = other.dequantized_base().flatten().view(-1, 64).gather(1, top)
        assert torch.equal(mine, blocks.gather(1, top)), name
        assert not torch.equal(theirs, blocks.gather(1, top)), name
    opt = method.build_optimizer(model)
    perturb_adapters(model)
    merged = {name: layer.merged_weight() for name, layer in lowrank_layers(model)}
    method._restart(model, opt)
    for name, layer in lowrank_layers(model):
        torch.testing.assert_close(layer.merged_weight(), merged[name], rtol=0, atol=2e-5)
