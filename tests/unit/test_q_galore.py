"""Q-GaLore against q-galore-torch 1.0's pure-torch simulation (bit for bit where the algorithm is the same) and exact
invariants: group quantisation, stochastic rounding, int4 packing, the adaptive gap, the optimizer step, resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from megatron_pept.optim.galore.q_galore import QGaLoreAdamW8bit
from megatron_pept.optim.galore.quantize import (
    NOISE_ROWS,
    dequantize_groups,
    next_gap,
    pack_int4,
    quantize_groups,
    rounding_noise,
    unpack_int4,
)

REASON = "q-galore-torch 1.0 is not installed (pip install --no-deps q-galore-torch==1.0; the dev extra lists it)"


def reference_projector():
    try:
        from q_galore_torch import q_galore_projector_simulate
    except ImportError:
        pytest.skip(REASON)
    return q_galore_projector_simulate


def reference_optimizer():
    try:
        from q_galore_torch import q_galore_adamw8bit_simulate
    except ImportError:
        pytest.skip(REASON)
    return q_galore_adamw8bit_simulate


def spread(shape, seed=0) -> torch.Tensor:
    """Values whose groups have various ranges and offsets (all positive, all negative, mixed, tiny)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w = w * torch.rand(shape[0], 1, generator=gen) * 3
    w[0] += 5.0  # all positive: the zero point clamps at 0
    w[1] -= 5.0  # all negative: it clamps at the top code
    w[2] *= 1e-7  # a range below the scale floor (1e-5)
    return w


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 256)])
def test_projector_quantisation_equals_reference(bits: int, group_size: int) -> None:
    ref = reference_projector().GaLoreProjector(rank=4)
    w = spread((16, 64))
    codes, scales, zeros = quantize_groups(w, group_size=group_size, bits=bits)
    ref_codes, ref_scales, ref_zeros, shape = ref._quantize(w, q_group_size=group_size, n_bit=bits)
    assert torch.equal(codes.reshape(-1, group_size).float(), ref_codes)
    assert torch.equal(scales, ref_scales) and torch.equal(zeros.float(), ref_zeros)
    ref_deq = (ref_scales * (ref_codes.to(ref_scales.dtype) - ref_zeros)).reshape(shape)
    deq = dequantize_groups(codes, scales, zeros, group_size=group_size)
    assert torch.equal(deq, ref_deq)  # bit for bit
    assert codes.dtype == zeros.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1


def test_int4_packing_round_trips_in_half_the_bytes() -> None:
    codes = torch.randint(0, 16, (8, 6), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == 24 and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, codes.shape), codes)


def test_weight_nearest_and_stochastic_rounding_equal_reference() -> None:
    sim = reference_optimizer().AdamW8bit
    w = spread((8, 64), seed=1)
    # nearest
    codes, scales, zeros = quantize_groups(w, group_size=32, bits=8)
    assert torch.equal(dequantize_groups(codes, scales, zeros, group_size=32), sim._quantize(None, w, q_group_size=32))
    # stochastic, given the same uniform draws
    torch.manual_seed(7)
    ref = sim._quantize_stochastic_round(None, w, q_group_size=32)
    noise = torch.rand((16, 32), generator=torch.Generator().manual_seed(7))
    codes, scales, zeros = quantize_groups(w, group_size=32, bits=8, noise=noise)
    assert torch.equal(dequantize_groups(codes, scales, zeros, group_size=32), ref)


def test_stochastic_rounding_is_unbiased() -> None:
    w = torch.linspace(-1, 1, 64).repeat(4096, 1)  # each row the same group: the mean over rows estimates E[q]
    exact_codes, scales, zeros = quantize_groups(w[:1], group_size=64, bits=8)
    x = w[:1] / scales + zeros.float()
    noise = torch.rand(w.shape, generator=torch.Generator().manual_seed(0))
    codes, _, _ = quantize_groups(w, group_size=64, bits=8, noise=noise)
    inner = slice(1, -1)  # the ends sit at -0.5 and 255.5 codes, which the clamp cuts (as q-galore-torch's does)
    assert (codes.float().mean(0) - x[0])[inner].abs().max() < 0.03  # nearest rounding errs up to 0.5
    assert ((codes.float() - x)[:, inner].abs() < 1).all()  # always one of the two neighbours


def test_rounding_noise_does_not_depend_on_the_rows_a_rank_holds() -> None:
    rows, cols = 3 * NOISE_ROWS + 5, 8
    whole = rounding_noise(11, 4, rows=(0, rows), cols=cols, device="cpu")
    assert whole.shape == (rows, cols)
    for start, stop in [(0, 100), (100, rows), (63, 64), (rows, rows)]:
        assert torch.equal(rounding_noise(11, 4, rows=(start, stop), cols=cols, device="cpu"), whole[start:stop])
    assert not torch.equal(rounding_noise(11, 5, rows=(0, rows), cols=cols, device="cpu"), whole)


def test_next_gap_is_the_cosine_queue_rule() -> None:
    assert next_gap(200, [0.9, 0.9], queue_size=3, cos_threshold=0.4, gamma=2) == 200  # queue not full
    assert next_gap(200, [0.9, 0.1, 0.3], queue_size=3, cos_threshold=0.4, gamma=2) == 400  # mean 0.4333 >= 0.4
    assert next_gap(200, [0.2, 0.2, 0.3], queue_size=3, cos_threshold=0.4, gamma=2) == 200
    assert next_gap(200, [0.5, 0.5, 0.5], queue_size=3, cos_threshold=0.4, gamma=2) == 400
    assert next_gap(201, [0.5, 0.5], queue_size=2, cos_threshold=0.4, gamma=1.5) == 301  # int() truncates


# ---------------------------------------------------------------------------------------------------------------
# The optimizer step against the simulation


class Layer:
    """An int8 layer as the optimizer sees it (the method's module has the same attributes)."""

    def __init__(self, w: torch.Tensor, group_size: int) -> None:
        codes, scales, zeros = quantize_groups(w, group_size=group_size, bits=8)
        rows = w.shape[0]
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_scales = nn.Parameter(scales.reshape(rows, -1), requires_grad=False)
        self.weight_zeros = nn.Parameter(zeros.reshape(rows, -1), requires_grad=False)
        self.group_size = group_size
        self.weight_grad = None

    def dense(self) -> torch.Tensor:
        return dequantize_groups(self.weight, self.weight_scales, self.weight_zeros, group_size=self.group_size)


SHAPES = [(512, 64), (64, 256)]  # a right projection and a left one (8-bit moments: 512 x 8 and 16 x 256)
RANKS = [8, 16]
GROUP = dict(update_proj_gap=2, scale=0.25, proj_type="std", cos_threshold=0.4, gamma_proj=2, queue_size=2)


def gradients(step: int) -> list[torch.Tensor]:
    """A dominant subspace that stays (so the similarity queue fills with high cosines) plus fresh noise."""
    gen = torch.Generator().manual_seed(100 + step)
    fixed = torch.Generator().manual_seed(5)
    out = []
    for m, n in SHAPES:
        base = torch.randn(m, 1, generator=fixed) @ torch.randn(1, n, generator=fixed)
        out.append(base * 0.05 + 0.01 * torch.randn(m, n, generator=gen))
    out.append(torch.randn(128, 64, generator=gen) * 0.01)  # embedding: 8-bit moments, unprojected
    out.append(torch.randn(64, generator=gen) * 0.01)  # norm: fp32 moments
    return out


def build_pair(*, wd: float = 0.0, proj_quant: bool = True):
    sim = reference_optimizer()
    gen = torch.Generator().manual_seed(0)
    layers = [Layer(torch.randn(shape, generator=gen) * 0.05, 64) for shape in SHAPES]
    emb = nn.Parameter(torch.randn(128, 64, generator=gen))
    norm = nn.Parameter(torch.ones(64))
    ref_w = [nn.Parameter(layer.dense().clone()) for layer in layers]  # the simulation's fake-quantised weights
    for p in ref_w:
        p.group_size, p.stochastic_round = 64, True
    ref_emb, ref_norm = nn.Parameter(emb.detach().clone()), nn.Parameter(norm.detach().clone())
    quant = dict(quant=proj_quant, quant_n_bit=4, quant_group_size=128)
    ref = sim.AdamW8bit(
        [{"params": [ref_emb, ref_norm]}]
        + [{"params": [p], "rank": r, **GROUP, **quant} for p, r in zip(ref_w, RANKS)],
        lr=1e-2,
        betas=(0.9, 0.95),
        weight_decay=wd,
    )
    own = dict(proj_quant=proj_quant, proj_bits=4, proj_group_size=128, weight_group_size=64)
    generator = torch.Generator()
    ours = QGaLoreAdamW8bit(
        [{"params": [emb, norm]}]
        + [{"params": [layer.weight], "rank": r, **GROUP, **own} for layer, r in zip(layers, RANKS)],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=wd,
        int8_layers={layer.weight: layer for layer in layers},
        noise=lambda p, step, shape: torch.rand(shape, generator=generator),
    )
    return (ref, ref_w, ref_emb, ref_norm), (ours, layers, emb, norm, generator)


@pytest.mark.parametrize("wd,proj_quant", [(0.0, True), (0.1, True), (0.0, False)])
def test_optimizer_step_equals_reference_simulation(monkeypatch, wd: float, proj_quant: bool) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # the simulation calls it every step
    (ref, ref_w, ref_emb, ref_norm), (ours, layers, emb, norm, generator) = build_pair(wd=wd, proj_quant=proj_quant)
    gaps = []
    for step in range(10):
        grads = gradients(step)
        for p, g in zip([*ref_w, ref_emb, ref_norm], grads):
            p.grad = g.clone()
        for layer, g in zip(layers, grads):
            layer.weight_grad = g.clone()
        emb.grad, norm.grad = grads[2].clone(), grads[3].clone()
        torch.manual_seed(1000 + step)  # the simulation's stochastic rounding draws from the global generator
        ref.step()
        generator.manual_seed(1000 + step)  # ours: the same draws, in the same parameter order
        ours.step()
        ours.zero_grad()
        for layer, p in zip(layers, ref_w):
            assert torch.equal(layer.dense(), p.data), step
        assert torch.equal(emb, ref_emb) and torch.equal(norm, ref_norm)
        gaps.append([int(ours.state[layer.weight]["proj_gap"]) for layer in layers])
        assert gaps[-1] == [ref.state[p]["projector"].update_proj_gap for p in ref_w]
    assert gaps[-1] != gaps[0]  # the adaptive rule grew the gap
    assert ours.state[layers[0].weight]["exp_avg_q"].dtype == torch.uint8  # 8-bit moments
    if proj_quant:
        state = ours.state[layers[0].weight]
        assert state["proj_q"].dtype == torch.uint8 and state["proj_q"].numel() == 8 * 64 // 2  # int4, packed


def test_resume_mid_gap_is_bit_identical() -> None:
    def run(steps, opt_pair, start=0):
        ours, layers, emb, norm = opt_pair
        for step in range(start, steps):
            grads = gradients(step)
            for layer, g in zip(layers, grads):
                layer.weight_grad = g.clone()
            emb.grad, norm.grad = grads[2].clone(), grads[3].clone()
            ours.step()
            ours.zero_grad()

    def fresh(seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        layers = [Layer(torch.randn(shape, generator=gen) * 0.05, 64) for shape in SHAPES]
        emb, norm = nn.Parameter(torch.randn(128, 64, generator=gen)), nn.Parameter(torch.ones(64))
        names = {layer.weight: f"w{i}" for i, layer in enumerate(layers)}
        opt = QGaLoreAdamW8bit(
            [{"params": [emb, norm]}]
            + [
                {"params": [layer.weight], "rank": r, **GROUP, "proj_group_size": 128, "weight_group_size": 64}
                for layer, r in zip(layers, RANKS)
            ],
            lr=1e-2,
            int8_layers={layer.weight: layer for layer in layers},
            param_names=names,
        )
        return opt, layers, emb, norm

    whole = fresh()
    run(9, whole)
    first = fresh()
    run(5, first)
    keys = ("weight", "weight_scales", "weight_zeros")
    tensors = {f"l{i}.{k}": getattr(layer, k) for i, layer in enumerate(first[1]) for k in keys}
    buffer = io.BytesIO()
    torch.save({"model": {**tensors, "emb": first[2], "norm": first[3]}, "optim": first[0].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # every piece of state is a tensor
    resumed = fresh(seed=3)
    for i, layer in enumerate(resumed[1]):
        for k in ("weight", "weight_scales", "weight_zeros"):
            getattr(layer, k).data.copy_(saved["model"][f"l{i}.{k}"])
    resumed[2].data.copy_(saved["model"]["emb"])
    resumed[3].data.copy_(saved["model"]["norm"])
    resumed[0].load_state_dict(saved["optim"])
    state = resumed[0].state[resumed[1][0].weight]
    assert state["proj_q"].dtype == state["exp_avg_q"].dtype == torch.uint8
    assert state["proj_gap"].device.type == "cpu"
    run(9, resumed, start=5)
    for a, b in zip(whole[1], resumed[1]):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scales, b.weight_scales)
    assert torch.equal(whole[2], resumed[2])


def test_weights_stay_int8_and_training_moves_them() -> None:
    layer = Layer(torch.randn(64, 64) * 0.05, 64)
    start = layer.dense().clone()
    opt = QGaLoreAdamW8bit(
        [{"params": [layer.weight], "rank": 4, "proj_group_size": 64, "weight_group_size": 64}],
        lr=1e-2,
        int8_layers={layer.weight: layer},
        param_names={layer.weight: "w"},
    )
    for _ in range(3):
        layer.weight_grad = torch.randn(64, 64)
        opt.step()
        opt.zero_grad()
        assert layer.weight_grad is None
    assert layer.weight.dtype == torch.uint8 and layer.weight_zeros.dtype == torch.uint8
    assert (layer.dense() - start).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Settings refused at validation, in one line


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["parallel.backend=deepspeed"], "cannot run with parallel.backend=deepspeed"),
        (["optim.per_layer=true", "parallel.backend=ddp"], "runs on one process in this version"),
        (["optim.per_layer=true", "parallel.backend=fsdp2"], "use parallel.backend=single or optim.per_layer=false"),
        (["method.weight_group_size=256"], "e.g. 32"),  # the 60m MLP's 1376 = 32 x 43
        (["method.proj_group_size=96"], "method.proj_group_size=96"),
        (["method.proj_bits=9"], "method.proj_bits"),
        (["method.svd=randomized"], "method.svd must be full"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides: list[str], words: str) -> None:
    from megatron_pept.errors import ConfigError
    from megatron_pept.registry import load_config

    base = ["model.name=60m", "data.path=data/x", "method.name=q_galore", "method.weight_group_size=32"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, *overrides])
    assert words in str(err.value) and "\n" not in str(err.value)
    load_config(None, base)  # the same without the bad setting is accepted
