"""The GPU-only kernels and storage formats, trained: flash-attn and transformer-engine against SDPA over 50 steps;
8-bit GaLore on bitsandbytes' CUDA kernels; int8, NF4 and fp8 frozen bases with the fp32 master in host memory.
Skipped without CUDA; a test whose optional package does not import is skipped (that package only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_support import (
    DEVICE,
    HAS_CUDA,
    ON_CPU,
    assert_loss_falls,
    import_or_skip,
    make_trainer,
    max_gap,
    requires_gpu,
    train,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

# -- attention kernels --------------------------------------------------------------------------------------------

KERNEL_STEPS = 50
KERNELS = {
    "flash": ("flash_attn", "FlashAttention"),
    "te": ("transformer_engine.pytorch", "TransformerEngineAttention"),
}
if ON_CPU and not HAS_CUDA:  # the body, run on the CPU with sdpa against itself (gap 0): the plumbing only
    KERNELS["sdpa"] = (None, "SDPAAttention")


@pytest.fixture(scope="module")
def sdpa_curves(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """The loss curves of the reference kernel over the same 50 steps, in bf16 and in fp32."""
    tmp = tmp_path_factory.mktemp("sdpa")
    return {
        dtype: train(quickstart_data, tmp / dtype, f"train.dtype={dtype}", "optim.warmup_steps=5", steps=KERNEL_STEPS)
        for dtype in ("bf16", "fp32")
    }


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_an_attention_kernel_trains_as_sdpa_does(
    kernel: str, sdpa_curves: dict[str, list[float]], quickstart_data: Path, tmp_path: Path
) -> None:
    """50 bf16 training steps with ``model.attention=flash`` (or ``te``) from the same weights and batches as
    ``sdpa``. Tolerance: at every step the loss is within twice the largest per-step gap between sdpa's own bf16
    and fp32 curves (at least 1e-3). A kernel computes the same attention in another order, a perturbation of the
    size of bf16 rounding inside one op; bf16 against fp32 perturbs every op by that much, so a correct kernel stays
    inside the bound, while a wrong mask, scale or head layout trains another function and leaves it. Measured on
    the CPU with the debug model (the bound 3.1e-3 there): attention computed by hand with an fp32 softmax stayed at
    1.1e-3, the same without the causal mask went to 6.4e-2."""
    module, class_name = KERNELS[kernel]
    if module is not None:
        import_or_skip(module)
    with make_trainer(
        quickstart_data, tmp_path / kernel, f"model.attention={kernel}", "optim.warmup_steps=5", steps=KERNEL_STEPS
    ) as trainer:
        cores = {type(layer.self_attn.core).__name__ for layer in trainer.raw_model.model.layers.values()}
        assert cores == {class_name}
        losses = trainer.train().train_losses
    reference = sdpa_curves["bf16"]
    noise = max_gap(reference, sdpa_curves["fp32"])
    bound = max(2 * noise, 1e-3)
    gap = max_gap(losses, reference)
    assert gap <= bound, (
        f"{kernel} vs sdpa: largest per-step loss gap {gap:.4g} > {bound:.4g} ({losses} vs {reference})"
    )
    assert_loss_falls(losses, what=kernel)


# -- 8-bit GaLore -------------------------------------------------------------------------------------------------


def test_galore_8bit_trains_on_bitsandbytes_kernels(quickstart_data: Path, tmp_path: Path) -> None:
    """10 steps of galore_8bit with a refresh at step 5: the moments are uint8 tensors on the device, made and read
    by bitsandbytes' compiled kernels for that device (its CUDA kernels on a GPU; the calls into its library are
    counted, so a pure-torch path would show none), and the loss falls."""
    import_or_skip("bitsandbytes")
    from megatron_pept.bench.gpu_check.galore_8bit import blockwise_calls, bnb_native_calls

    with make_trainer(
        quickstart_data, tmp_path / "run", "method.name=galore_8bit", "method.rank=64", "method.update_proj_gap=5"
    ) as trainer:
        with bnb_native_calls(DEVICE) as calls:
            losses = trainer.train().train_losses
        states = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    quantised = [v for v in states if v.dtype == torch.uint8]
    assert quantised and all(v.device.type == DEVICE.type for v in quantised), [(v.dtype, v.device) for v in states]
    quantise, dequantise = blockwise_calls(calls)
    assert quantise > 0 and dequantise > 0, dict(calls)
    if HAS_CUDA:
        assert not [name for name in calls if "_cpu_" in name], dict(calls)  # CUDA kernels, not the CPU ones
    assert_loss_falls(losses, what="galore_8bit")


# -- quantised frozen bases -----------------------------------------------------------------------------------------

Q_DTYPES = {"int8": torch.int8, "nf4": torch.uint8, "fp8": torch.float8_e4m3fn}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``, compared exactly whatever its dtype (torch.equal has no fp8 kernel everywhere)."""
    return t.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


@pytest.mark.parametrize("fmt", list(Q_DTYPES))
def test_a_quantised_base_trains_with_its_master_in_host_memory(fmt: str, quickstart_data: Path, tmp_path: Path):
    """ReLoRA over an int8, NF4 or fp8 base with ``method.base_master=host`` (the default), one restart (step 5)
    within 10 steps: the device holds the quantised parts and the adapters, the exact fp32 master that merges go
    into is in host memory (``base_master`` on the CPU), the dense weight is gone, the stored parts are exactly the
    master quantised (the restart merged into the master and requantised from it), and the loss falls. fp8 is a
    storage format (dequantised to the compute dtype, no fp8 matmul), so it runs on any GPU, not only on compute
    capability 8.9+ where fp8 compute would need it; it runs here whatever the GPU."""
    from megatron_pept.methods.relora import lowrank_layers
    from megatron_pept.quant import quantize

    if fmt == "nf4":
        import_or_skip("torchao")
    extra = ("method.name=relora", f"method.base_dtype={fmt}", "method.reset_every=5", "method.restart_warmup_steps=2")
    with make_trainer(quickstart_data, tmp_path / fmt, *extra) as trainer:
        losses = trainer.train().train_losses
        assert trainer.method.restart_count == 1
        layers = lowrank_layers(trainer.raw_model)
        assert layers
        for name, layer in layers:
            assert layer.weight is None and layer.quantised, name
            parts = {k.removeprefix("base_"): v for k, v in layer.named_buffers(recurse=False) if k.startswith("base_")}
            master = parts.pop("master")
            assert master.device.type == "cpu" and master.dtype == torch.float32, (name, master.device)
            assert parts["q"].dtype == Q_DTYPES[fmt], (name, parts["q"].dtype)
            for part, value in parts.items():
                assert value.device.type == DEVICE.type, (name, part, value.device)
            for p in layer.adapter_parameters():
                assert p.device.type == DEVICE.type and p.requires_grad, name
            kwargs = {"double_quant": layer.double_quant} if fmt == "nf4" else {}
            expected = quantize(master.to(DEVICE), fmt, **kwargs)
            assert expected.keys() == parts.keys(), name
            for part, value in expected.items():
                assert torch.equal(_bits(parts[part]), _bits(value)), (name, part)
    assert_loss_falls(losses, what=f"relora on a {fmt} base")
