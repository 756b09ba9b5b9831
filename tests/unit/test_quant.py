"""Low-precision storage of frozen bases (megatron_pept.quant): formats against their error bounds and against
torchao's own NF4 tensor, exact round trips through a checkpoint file, unbiased stochastic rounding, and the
requantisation drift measurement the design rests on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_pept.quant import dequantize, part_shapes, quantize, quantized_bytes, requantisation_drift


def weight(rows: int = 128, cols: int = 256, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3] = 0.0  # a zero row must not divide by zero
    return w


def test_int8_rows_are_within_half_a_step() -> None:
    w = weight()
    parts = quantize(w, "int8")
    assert parts["q"].dtype == torch.int8 and parts["q"].abs().max() <= 127
    step = w.abs().amax(dim=1) / 127
    err = (dequantize(parts, "int8", w.shape) - w).abs()
    assert (err <= step[:, None] / 2 + 1e-9).all()
    assert torch.equal(dequantize(parts, "int8", w.shape)[3], torch.zeros(w.shape[1]))
    assert quantized_bytes(parts) == w.numel() + 4 * w.shape[0]


def test_nf4_equals_torchao_and_is_about_a_quarter_of_bf16() -> None:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    w = weight()
    ours = dequantize(quantize(w, "nf4"), "nf4", w.shape)
    assert torch.equal(ours, to_nf4(w, block_size=64, scaler_block_size=256).get_original_weight().float())
    assert float((ours - w).norm() / w.norm()) < 0.1  # 4-bit NormalFloat on Gaussian weights: about 9%
    ratio = quantized_bytes(quantize(w, "nf4")) / (w.numel() * 2)
    assert 0.25 < ratio < 0.28  # of bf16: 4 bits per weight, the double-quantised scales and a few constants


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_checkpoint_file_restores_the_base_bit_exactly(fmt: str, tmp_path: Path) -> None:
    w = weight()
    parts = quantize(w, fmt)
    torch.save(parts, tmp_path / "base.pt")
    loaded = torch.load(tmp_path / "base.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in parts.items())
    assert torch.equal(dequantize(loaded, fmt, w.shape), dequantize(parts, fmt, w.shape))


def test_stochastic_rounding_is_unbiased() -> None:
    w = weight(8, 256)
    gen = torch.Generator().manual_seed(1)
    mean = sum(dequantize(quantize(w, "int8", round="stochastic", generator=gen), "int8", w.shape) for _ in range(400))
    step = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    assert ((mean / 400 - w).abs() / step).max() < 0.2  # nearest rounding is off by up to 0.5 step, biased


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown quantisation format"):
        quantize(weight(), "fp3")
    with pytest.raises(ValueError, match="divide into blocks"):
        quantize(torch.randn(10, 10), "nf4")
    for fmt in ("int8", "nf4"):  # the shapes announced before quantising are the ones produced
        parts = quantize(torch.randn(176, 64), fmt)
        assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == part_shapes(fmt, (176, 64))
    with pytest.raises(ValueError, match="nearest code only"):
        quantize(weight(), "nf4", round="stochastic")


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_requantising_at_every_merge_drifts_unless_the_loss_is_carried(fmt: str) -> None:
    """50 merges of small updates (1e-3 of the weight's norm each): requantising to the nearest code keeps no more
    of the merged training than noise of its size (int8) or lets the error grow (NF4: block scales move and every
    code re-rounds); carrying what each requantisation lost into the next merge keeps the stored base within one
    quantisation of the exact one. Numbers: docs/benchmarks.md (tools/bench.py --suite quant)."""
    runs = requantisation_drift(fmt, shape=(128, 256), restarts=50, update_scale=1e-3)
    nearest, carry = runs["nearest"], runs["carry"]
    first = carry["error"][0]
    # Bounded: the stored base stays within about two quantisation errors (the first one and the carried one).
    assert max(carry["error"]) < 1.5 * first
    assert carry["lost"][-1] < carry["lost"][0]  # the residual stays bounded while the merged training grows
    assert nearest["lost"][-1] > 1.0  # the stored change differs from the merged training by more than its size
    assert carry["error"][-1] < nearest["error"][-1]
    master = runs["master"]["error"]
    assert max(master) <= 1.01 * master[0]  # quantised afresh from an exact master: no drift at all
    if fmt == "nf4":
        assert nearest["error"][-1] > 1.05 * nearest["error"][0]  # nearest NF4 requantisation random-walks
