"""The Muon family (megatron_pept.optim.muon, megatron_pept.methods.muon): Muon against torch.optim.Muon and its
AdamW part against torch.optim.AdamW bit for bit, NorMuon against pytorch-optimizer's NorMuon bit for bit, Dion's
properties from its paper (no package on the index implements it), per-layer updates equal to the global step, and
the bad-input paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_pept.config import MethodConfig, ModelConfig, OptimConfig
from megatron_pept.errors import ConfigError
from megatron_pept.methods import build_method
from megatron_pept.models import build_model, llama_args
from megatron_pept.optim.muon import (
    OrthogonalOptimizer,
    dion_rank,
    dion_sketch,
    muon_lr_ratio,
    newton_schulz,
    orthonormalize_rows,
)
from megatron_pept.optim.weight_update import WeightUpdate
from megatron_pept.registry import load_config
from megatron_pept.trainer import Trainer

SHAPES = [(16, 8), (8, 24), (12, 12)]


def pair(shapes=SHAPES, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def step_both(ours, theirs, opts, steps: int = 4, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_muon_bit_for_bit(adjust: str, nesterov: bool) -> None:
    """The matrices: torch.optim.Muon (torch 2.13) at the same settings; the vectors: torch.optim.AdamW."""
    ours, theirs = pair()
    vec, vec_ref = pair([(7,), (5,)], seed=3)
    opt = OrthogonalOptimizer(
        [
            {"params": ours, "algorithm": "muon", "lr_adjust": adjust, "nesterov": nesterov, "momentum": 0.9},
            {"params": vec, "weight_decay": 0.0},
        ],
        lr=0.02,
        weight_decay=0.1,
        betas=(0.9, 0.95),
    )
    muon = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    adamw = torch.optim.AdamW(vec_ref, lr=0.02, weight_decay=0.0, betas=(0.9, 0.95), foreach=False)
    step_both(ours + vec, theirs + vec_ref, [opt, muon, adamw])
    for a, b in zip(ours + vec, theirs + vec_ref):
        assert torch.equal(a, b)


def test_the_adamw_part_decays_as_torch_adamw() -> None:
    ours, theirs = pair([(6, 5), (4,)])
    opt = OrthogonalOptimizer([{"params": ours}], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, foreach=False)
    step_both(ours, theirs, [opt, ref])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("rule,scale", [("match_rms_adamw", "match_rms"), ("original", "preserve_norm")])
def test_normuon_equals_pytorch_optimizers_normuon_bit_for_bit(rule: str, scale: str) -> None:
    """NorMuon (Li et al. 2025, Algorithm 1): match_rms_adamw is pytorch-optimizer 4.1.0's update_scale=match_rms
    (the paper's RMS of 0.2), original its preserve_norm (the official code's), both with its own Newton-Schulz."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ours, theirs = pair()
    opt = OrthogonalOptimizer([{"params": ours, "algorithm": "normuon", "lr_adjust": rule}], lr=0.02, weight_decay=0.1)
    ref = pytorch_optimizer.NorMuon(
        [{"params": theirs, "use_muon": True}], lr=0.02, weight_decay=0.1, update_scale=scale, foreach=False
    )
    step_both(ours, theirs, [opt, ref])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_newton_schulz_in_fp32_is_closer_to_orthogonal_than_in_bf16() -> None:
    """Both put the singular values of a random matrix near 1 (the quintic's band, roughly [0.7, 1.2]); fp32 iterates
    without bf16's rounding (docs/benchmarks.md measures the cost)."""
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float32):
        s = torch.linalg.svdvals(newton_schulz(g, dtype=dtype).float())
        assert float(s.min()) > 0.6 and float(s.max()) < 1.25, (dtype, s)
    exact = newton_schulz(g.double(), dtype=torch.float64)
    errors = {d: float((newton_schulz(g, dtype=d).double() - exact).norm()) for d in (torch.bfloat16, torch.float32)}
    assert errors[torch.float32] < errors[torch.bfloat16] / 100


def test_lr_ratios() -> None:
    assert muon_lr_ratio((64, 16), "original") == 2.0 and muon_lr_ratio((16, 64), "original") == 1.0
    assert muon_lr_ratio((64, 256), "match_rms_adamw") == pytest.approx(0.2 * 16)


# -- Dion: the paper's properties (Ahn et al. 2025, Algorithm 1) -------------------------------------------------


def dion_once(shape, rank: int, *, momentum: float = 0.9, lr_adjust: str = "match_rms_adamw", steps: int = 1):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    opt = OrthogonalOptimizer(
        [{"params": [w], "algorithm": "dion", "dion_rank": rank, "momentum": momentum, "lr_adjust": lr_adjust}],
        lr=0.01,
        param_names={w: "w"},
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        before_m = opt.state[w]["momentum_buffer"].clone() if opt.state.get(w) else torch.zeros(shape)
        before_w = w.detach().clone()
        w.grad = torch.randn(shape, generator=gen)
        b = before_m + w.grad  # B_t = M_{t-1} + G_t
        opt.step()
    return w, opt, b, before_w


def test_dion_orthonormalises_p_and_normalises_q() -> None:
    """Algorithm 1: P_t = Orthogonalize(B_t Q_{t-1}) has orthonormal columns, Q_t = ColumnNormalize(R_t) unit
    columns; the randomized Cholesky QR keeps P orthonormal for an ill-conditioned B Q too."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(80, 8, generator=gen) @ torch.diag(torch.logspace(3, -3, 8))
    q = orthonormalize_rows(p, dion_sketch(80, 8, seed=5), torch.ones(80), lambda t: t)
    assert torch.allclose(q.T @ q, torch.eye(8), atol=1e-5)
    assert torch.allclose(q @ (q.T @ p), p, atol=1e-3 * float(p.norm()))  # the same column space
    _, opt, _, _ = dion_once((24, 16), 4, steps=3)
    q_state = next(iter(opt.state.values()))["dion_q"]
    assert torch.allclose(q_state.norm(dim=0), torch.ones(4), atol=1e-6)


def test_dion_error_feedback_keeps_what_the_low_rank_step_did_not_apply() -> None:
    """Algorithm 1: M_t = B_t - (1 - mu) P_t R_t^T. The update applied is P_t Q_t^T (times the learning rate and the
    scale); what the rank-r approximation P_t R_t^T misses, B_t - P_t R_t^T, stays in the momentum whole, and so
    does mu times what it caught: M_t = (B_t - P R^T) + mu P R^T."""
    w, opt, b, before = dion_once((24, 16), 4, steps=2)
    m = opt.state[w]["momentum_buffer"]
    low = b - m  # (1 - mu) P R^T
    approx = low / (1 - 0.9)
    assert torch.linalg.matrix_rank(approx, atol=1e-4) == 4
    assert torch.allclose(m, (b - approx) + 0.9 * approx, atol=1e-5)
    residual = float((b - approx).norm())
    assert float(opt.step_stats()["dion_residual_sq"]) == pytest.approx(residual**2, rel=1e-4)
    # the update is rank r with an RMS of 0.2 per unit of learning rate (match_rms_adamw)
    update = (before - w.detach()) / 0.01
    assert torch.linalg.matrix_rank(update, atol=1e-4) == 4
    assert float(update.square().mean().sqrt()) == pytest.approx(0.2, rel=1e-4)


def test_dion_at_full_rank_is_plain_momentum_with_an_orthonormal_basis() -> None:
    """At r = min(m, n), P R^T = P P^T B = B: error feedback leaves M_t = mu B_t (ordinary momentum), nothing is
    residual, and the update P Q^T has orthonormal P (the paper: Dion at full rank is an orthonormalised update)."""
    w, opt, b, before = dion_once((24, 16), 16, momentum=0.8)
    assert torch.allclose(opt.state[w]["momentum_buffer"], 0.8 * b, atol=1e-5)
    assert float(opt.step_stats()["dion_residual_sq"]) < 1e-8 * float(b.square().sum())
    update = (before - w.detach()) / (0.01 * 0.2 * math.sqrt(24 * 16 / 16))  # P Q^T
    # ||P Q^T||_F^2 = trace(Q P^T P Q^T) = ||Q||_F^2 = r: P orthonormal, Q's r columns unit
    assert float(update.norm()) ** 2 == pytest.approx(16, rel=1e-4)
    assert torch.linalg.matrix_rank(update, atol=1e-4) == 16


def test_dion_rank_from_a_number_or_a_fraction() -> None:
    assert dion_rank((64, 176), rank=128, fraction=None) == 64
    assert dion_rank((64, 176), rank=8, fraction=None) == 8
    assert dion_rank((64, 176), rank=8, fraction=0.25) == 16
    assert dion_rank((32, 64), rank=8, fraction=1 / 16) == 2


def test_dion_lr_adjust_original_is_the_papers_sqrt_m_over_n() -> None:
    w, _, _, before = dion_once((36, 16), 4, lr_adjust="original")
    update = (before - w.detach()) / 0.01
    assert float(update.norm()) == pytest.approx(math.sqrt(36 / 16) * 2.0, rel=1e-4)  # ||P Q^T||_F = sqrt(r)


# -- the methods ----------------------------------------------------------------------------------------------------


def debug_model() -> torch.nn.Module:
    model = build_model(llama_args(ModelConfig(name="debug"), vocab_size=97, max_seq_len=32))
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("name", ["muon", "normuon", "dion"])
def test_the_hidden_matrices_are_orthogonalised_the_rest_trains_with_adamw(name: str, caplog) -> None:
    model = debug_model()
    method = build_method(MethodConfig(name=name), optim_cfg=OptimConfig(), total_steps=10)
    with caplog.at_level("INFO", logger="megatron_pept"):
        optimizer = method.build_optimizer(model)
    by_name = {p: n for n, p in model.named_parameters()}
    groups: dict[str, list[str]] = {}
    for g in optimizer.param_groups:
        groups.setdefault(g["algorithm"], []).extend(by_name[p] for p in g["params"])
    assert sorted(groups) == ["adamw", name]
    assert len(groups[name]) == 14 and all(n.endswith("proj.weight") for n in groups[name])
    assert any("embed_tokens" in n for n in groups["adamw"]) and "lm_head.weight" in groups["adamw"]
    assert sum("orthogonalises 14 matrices" in r.getMessage() for r in caplog.records) == 1


def test_a_target_it_cannot_orthogonalise_goes_to_adamw_logged_once(caplog) -> None:
    model = debug_model()
    cfg = MethodConfig(name="muon", target_modules=["q_proj", "embed_tokens", "*norm"])
    method = build_method(cfg, optim_cfg=OptimConfig(), total_steps=10)
    with caplog.at_level("WARNING", logger="megatron_pept"):
        optimizer = method.build_optimizer(model)
        method.build_optimizer(model)
    said = [r.getMessage() for r in caplog.records if "cannot orthogonalise" in r.getMessage()]
    assert len(said) == 1 and "embed_tokens" in said[0]
    muon = next(g for g in optimizer.param_groups if g["algorithm"] == "muon")
    assert len(muon["params"]) == 2  # the q_proj of each layer


def tiny(data: Path, run_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"data.path={data}",
            "data.seq_len=32",
            "train.steps=3",
            "train.global_batch_size=8",
            "train.eval_interval=0",
            "train.eval_at_start=false",
            "optim.lr=3e-3",
            "optim.warmup_steps=1",
            "metrics.tensorboard=false",
            "metrics.peak_tflops=1.0",
            *overrides,
        ],
    )


@pytest.mark.parametrize("micro", [8, 4], ids=["no-accumulation", "accumulation"])
@pytest.mark.parametrize("name", ["muon", "normuon", "dion"])
def test_per_layer_equals_global_step(name: str, micro: int, quickstart_data: Path, tmp_path: Path) -> None:
    extra = [f"method.name={name}", f"train.micro_batch_size={micro}", "train.max_grad_norm=0"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "g", *extra))
    layered = Trainer(tiny(quickstart_data, tmp_path / "p", *extra, "optim.per_layer=true"))
    a, b = whole.train(), layered.train()
    assert a.train_losses == b.train_losses
    for (pname, pa), pb in zip(whole.model.named_parameters(), layered.model.parameters()):
        assert torch.equal(pa, pb), pname
    whole.close()
    layered.close()


def test_bad_settings_are_one_line(quickstart_data: Path, tmp_path: Path) -> None:
    for name in ("muon", "normuon"):  # dion runs per layer under FSDP2 (tests/distributed/test_muon_family.py)
        with pytest.raises(ConfigError, match="per_layer=true cannot run with parallel.backend=fsdp2"):
            tiny(quickstart_data, tmp_path, f"method.name={name}", "parallel.backend=fsdp2", "optim.per_layer=true")
    tiny(quickstart_data, tmp_path, "method.name=dion", "parallel.backend=fsdp2", "optim.per_layer=true")
    with pytest.raises(ConfigError, match=r"method.rank_fraction must be in \(0, 1\]"):
        tiny(quickstart_data, tmp_path, "method.name=dion", "method.rank_fraction=2")
    with pytest.raises(ConfigError, match="method.ns_dtype"):
        tiny(quickstart_data, tmp_path, "method.name=muon", "method.ns_dtype=fp16")


@pytest.mark.parametrize("algorithm", ["muon", "normuon", "dion", "adamw"])
def test_bf16_weights_take_the_fp32_step_rounded(algorithm: str) -> None:
    """With bf16 weights (no fp32 copy) each step's fp32 update, decay included, reaches the weight through a
    WeightUpdate: rounded to nearest, one step lands within a bf16 unit of the fp32 step from the same start."""
    ours, theirs = pair([(16, 8), (12, 12)])
    low = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in ours]
    with torch.no_grad():
        for p, q in zip(ours, low):
            p.copy_(q.float())
    names = {p: f"w{i}" for i, p in enumerate(ours)} | {p: f"w{i}" for i, p in enumerate(low)}
    group = {"algorithm": algorithm, "dion_rank": 4, "ns_dtype": "fp32"}
    exact = OrthogonalOptimizer([{"params": ours, **group}], lr=0.01, weight_decay=0.1, param_names=names)
    rounded = OrthogonalOptimizer([{"params": low, **group}], lr=0.01, weight_decay=0.1, param_names=names)
    rounded.weight_update = WeightUpdate("nearest", seed=0, names=names)
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(ours, low):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.to(torch.bfloat16)
    exact.step()
    rounded.step()
    for p, q in zip(ours, low):
        assert q.dtype == torch.bfloat16
        ulp = p.detach().abs() * 2.0**-7 + 1e-30
        assert bool(((q.float() - p.detach()).abs() <= ulp).all())
