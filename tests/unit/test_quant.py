"""Low-precision storage of frozen bases (megatron_pept.quant): formats against their error bounds and against
torchao's own NF4 tensor, exact round trips through a checkpoint file, unbiased stochastic rounding, and the
requantisation drift measurement the design rests on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_pept.quant import (
    FORMATS,
    dequantize,
    fp8_supported,
    part_shapes,
    quantize,
    quantized_bytes,
    requantisation_drift,
)


def torchao_to_nf4():
    """torchao's own ``to_nf4``, from where the installed version keeps it (it moved in torchao 0.18)."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


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
    to_nf4 = torchao_to_nf4()
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


def test_nf4_without_double_quant_packs_the_same_bytes_as_torchao() -> None:
    """The codes are the nearest of torchao's code values, packed in its nibble order: torchao codes with the exact
    block absmax too (only its stored scales are double-quantised), so the bytes must be identical."""
    to_nf4 = torchao_to_nf4()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(5)) * 0.02  # no zero blocks
    ours = quantize(w, "nf4", double_quant=False)
    t = to_nf4(w, block_size=64, scaler_block_size=256)
    assert torch.equal(ours["codebook"], t.nf4)
    assert ours["q"].dtype == torch.uint8 and torch.equal(ours["q"], t.quantized_data)
    assert torch.equal(ours["q"], quantize(w, "nf4")["q"])
    assert torch.equal(ours["absmax"], w.reshape(-1, 64).abs().amax(dim=1))
    # A zero block: torchao divides 0 by 0 and stores code 0 (-1.0); ours stores code 7 (0.0) and decodes to zero.
    w = weight()
    ours, theirs = quantize(w, "nf4", double_quant=False)["q"], to_nf4(w, 64, 256).quantized_data
    zero = (w.reshape(-1, 64).abs().amax(dim=1) == 0).repeat_interleave(32)  # the zero blocks' bytes
    assert zero.sum() == 128 and torch.equal(ours[~zero], theirs[~zero]) and (ours[zero] == 0x77).all()
    assert torch.equal(
        dequantize(quantize(w, "nf4", double_quant=False), "nf4", w.shape, double_quant=False)[3],
        torch.zeros(w.shape[1]),
    )


def test_nf4_without_double_quant_is_nearest_and_within_half_the_widest_gap() -> None:
    w = weight()
    parts = quantize(w, "nf4", double_quant=False)
    assert {k: v.dtype for k, v in parts.items()} == {
        "q": torch.uint8,
        "absmax": torch.float32,
        "codebook": torch.float32,
    }
    got = dequantize(parts, "nf4", w.shape, double_quant=False)
    codebook, absmax = parts["codebook"], parts["absmax"][:, None]
    err = (got - w).reshape(-1, 64).abs()
    bound = codebook.diff().max() / 2 * absmax  # (1.0 - 0.6962) / 2 = 0.152 of the block absmax
    assert (err <= bound * (1 + 1e-6)).all()
    assert (err / bound.clamp_min(1e-30)).max() > 0.3  # the bound is tight: Gaussian weights come close to it
    # Nearest: no other code value (times the block's absmax) is closer to any weight.
    best = (w.reshape(-1, 64, 1) - codebook * absmax[..., None]).abs().amin(dim=-1)
    assert torch.allclose(err, best, rtol=0, atol=1e-9)
    # The exact absmax is kept: each block's largest weight comes back exactly (double quantisation loses that).
    at_max = w.reshape(-1, 64).abs().argmax(dim=1, keepdim=True)
    assert (err.gather(1, at_max) == 0).all()
    dq = dequantize(quantize(w, "nf4"), "nf4", w.shape)
    assert ((dq - w).reshape(-1, 64).abs().gather(1, at_max)[parts["absmax"] > 0] > 0).any()
    assert quantized_bytes(parts) == w.numel() // 2 + 4 * w.numel() // 64 + 4 * 16
    assert (quantized_bytes(parts) - 64) / w.numel() == 0.5 + 4 / 64  # plus the 64-byte codebook
    # Frobenius: fp32 block scales do no worse than double-quantised ones. The codes are the same and the gap is
    # about 1e-4 of the error, so it takes a matrix this size to stand above the blocks' noise (at 128 x 256 the
    # order flips for some seeds: the absmax is not the least-squares scale for fixed codes).
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    plain = dequantize(quantize(w, "nf4", double_quant=False), "nf4", w.shape, double_quant=False)
    assert (plain - w).norm() < (dequantize(quantize(w, "nf4"), "nf4", w.shape) - w).norm()


def test_fp8_rows_are_within_e4m3_precision() -> None:
    w = weight()
    w[5] = torch.logspace(-6, 0, w.shape[1]) * 0.05  # small against the row's absmax: fp8 subnormals
    parts = quantize(w, "fp8")
    assert parts["q"].dtype == torch.float8_e4m3fn and parts["q"].shape == w.shape
    assert parts["scale"].dtype == torch.float32 and parts["scale"].shape == (w.shape[0],)
    got = dequantize(parts, "fp8", w.shape)
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    assert torch.equal(parts["scale"][:, None][scale > 0], scale[scale > 0])
    # x = w / scale lies in [-448, 448]. Normal e4m3 (|x| >= 2^-6) has 3 mantissa bits: x in [2^e, 2^(e+1)) is
    # rounded to a multiple of 2^(e-3), an error of at most 2^(e-4) <= 2^-4 |x|. Subnormals are multiples of 2^-9:
    # an error of at most 2^-10. Times the scale: |deq - w| <= 2^-4 |w| + 2^-10 scale; the fp32 division and
    # multiplication add a few 2^-24 relative (the factor 1 + 2^-16 covers them with room).
    bound = 2**-4 * w.abs() * (1 + 2**-16) + 2**-10 * scale
    err = (got - w).abs()
    assert (err <= bound).all()
    assert (err / bound.clamp_min(1e-30)).max() > 0.9  # tight: some weight lands near halfway between fp8 values
    sub = (w / scale).abs() < 2**-6
    assert sub[5].sum() > 50 and (err[sub] / bound[sub]).max() > 0.3  # the subnormal floor is reached too
    assert (err[sub] <= 2**-10 * scale.expand_as(w)[sub] * (1 + 2**-16)).all()
    assert torch.equal(got[3], torch.zeros(w.shape[1]))  # a zero row: scale 1, no division by zero
    assert quantized_bytes(parts) == w.numel() + 4 * w.shape[0]
    with pytest.raises(ValueError, match="nearest value only"):
        quantize(w, "fp8", round="stochastic")


@pytest.mark.parametrize("shape", [(176, 64), (128, 256)])
def test_announced_part_shapes_are_the_ones_produced(shape: tuple[int, int]) -> None:
    assert FORMATS == ("int8", "nf4", "fp8")
    w = torch.randn(shape)
    for fmt, kw in [
        ("int8", {}),
        ("fp8", {}),
        ("nf4", {}),
        ("nf4", {"double_quant": True}),
        ("nf4", {"double_quant": False}),
    ]:
        parts = quantize(w, fmt, **kw)
        assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == part_shapes(fmt, shape, **kw)
    assert set(part_shapes("nf4", shape, double_quant=False)) == {"q", "absmax", "codebook"}
    assert set(part_shapes("fp8", shape)) == {"q", "scale"}


def test_new_formats_restore_bit_exactly_from_a_checkpoint_file(tmp_path: Path) -> None:
    w = weight()
    for fmt, kw in [("fp8", {}), ("nf4", {"double_quant": False})]:
        parts = quantize(w, fmt, **kw)
        torch.save(parts, tmp_path / "base.pt")
        loaded = torch.load(tmp_path / "base.pt", weights_only=True)
        assert all(
            torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) and loaded[k].dtype == v.dtype
            for k, v in parts.items()
        )
        assert torch.equal(dequantize(loaded, fmt, w.shape, **kw), dequantize(parts, fmt, w.shape, **kw))
    with pytest.raises(ValueError, match="double_quant=True"):  # parts and setting that do not match are named
        dequantize(quantize(w, "nf4"), "nf4", w.shape, double_quant=False)
    with pytest.raises(ValueError, match="double_quant=False"):
        dequantize(quantize(w, "nf4", double_quant=False), "nf4", w.shape)


def test_fp8_compute_is_supported_only_on_cuda_with_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 *compute* (not what an fp8 frozen base needs: that is storage, and runs anywhere)."""
    line = fp8_supported(torch.device("cpu"))
    assert line is not None and "\n" not in line
    assert "compute capability 8.9" in line and "this device is cpu" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, supported in [((9, 0), True), ((8, 9), True), ((8, 6), False), ((8, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        line = fp8_supported(torch.device("cuda", 0))
        assert (line is None) == supported
        if not supported:
            assert line.endswith(f"compute capability {capability[0]}.{capability[1]}")


def test_fp8_requantisation_drift_rounds_to_the_nearest_only() -> None:
    """fp8 has no stochastic strategy; its nearest requantisation loses the merged updates (1e-3 of the weight
    against about 2^-5 relative precision) and carrying the loss keeps them, as for int8."""
    runs = requantisation_drift("fp8", shape=(128, 256), restarts=50, update_scale=1e-3)
    assert set(runs) == {"nearest", "carry", "master"}
    nearest, carry, master = runs["nearest"], runs["carry"], runs["master"]
    assert 0.02 < carry["error"][0] < 0.03  # fp8 e4m3 on Gaussian rows: about 2.6%
    assert max(carry["error"]) < 1.5 * carry["error"][0] and carry["lost"][-1] < carry["lost"][0]
    assert nearest["lost"][-1] > 1.0 and carry["error"][-1] < nearest["error"][-1]
    assert max(master["error"]) <= 1.01 * master["error"][0]


NF4_NEW, NF4_OLD = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"


def test_nf4_takes_torchao_from_where_the_installed_version_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao 0.18 moved NF4Tensor from torchao.dtypes.nf4tensor (0.10 to 0.17, which pyproject's floor allows)
    to torchao.quantization.quantize_.workflows.nf4: a torchao without the new path (simulated: the module is
    blocked in sys.modules) is used through the old one, with the same results; with neither, one line naming
    the extra."""
    import sys
    import types

    from megatron_pept import quant
    from megatron_pept.errors import ConfigError

    w = weight()
    parts = quantize(w, "nf4")
    expected = dequantize(parts, "nf4", w.shape)
    real = quant._nf4_module()
    old = types.ModuleType(NF4_OLD)  # the same classes under the old name, as torchao 0.17 has them
    for name in ("to_nf4", "NF4Tensor", "SubclassTensorArgs"):
        setattr(old, name, getattr(real, name))
    monkeypatch.setitem(sys.modules, NF4_NEW, None)  # `import` of it now fails, as on torchao < 0.18
    monkeypatch.setitem(sys.modules, NF4_OLD, old)
    quant._nf4_codes.cache_clear()
    try:
        assert quant._nf4_module() is old
        again = quantize(w, "nf4")
        assert all(torch.equal(again[k], parts[k]) for k in parts)
        assert torch.equal(dequantize(again, "nf4", w.shape), expected)
        assert torch.equal(quantize(w, "nf4", double_quant=False)["codebook"], real.to_nf4(w).nf4)
        monkeypatch.setitem(sys.modules, NF4_OLD, None)  # no torchao at all
        quant._nf4_codes.cache_clear()
        with pytest.raises(ConfigError, match=r"needs torchao .*megatron_pept\[quant\]"):
            quantize(w, "nf4")
    finally:
        quant._nf4_codes.cache_clear()
