"""The galore_8bit row of the GPU check: the ``60m`` model trained 4 steps on one batch by ``galore`` (fp32 moments)
and by ``galore_8bit`` (bitsandbytes' blockwise 8-bit moments, quantised by its CUDA kernels on a GPU), from the
same weights. Passes if the 8-bit run's total weight change has cosine >= 0.98 with the fp32 run's, a norm within
10% of it, lowers the loss, holds uint8 state tensors on the device, and its states were made by bitsandbytes' own
compiled kernels for the device (:func:`bnb_native_calls` counts the calls into its library: its CUDA kernels on a
GPU, not a pure-torch path).
"""

from __future__ import annotations

import contextlib
import importlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_pept.bench.gpu_check.harness import (
    _autocast,
    _describe_error,
    _free,
    _materialised,
    skip_unless_importable,
)
from megatron_pept.bench.gpu_check.settings import GpuCheckSettings
from megatron_pept.bench.gpu_check.verdicts import Row, Target


@contextlib.contextmanager
def bnb_native_calls(device: torch.device) -> Iterator[Counter]:
    """Count, by function name, the calls bitsandbytes makes into its compiled library for ``device`` while the block
    runs (``cquantize_blockwise_fp32``, ``cdequantize_blockwise_fp32`` ... on CUDA; the same with ``_cpu_`` on a
    CPU): proof that its own kernels ran, not a pure-torch fallback. bitsandbytes (>= 0.46) dispatches each op to
    the kernel registered for the tensor's device in ``bitsandbytes.backends.<device>.ops``, which calls the library
    through that module's ``lib``; that name is wrapped for the block. RuntimeError when bitsandbytes has no
    compiled backend loaded for the device."""
    try:
        ops = importlib.import_module(f"bitsandbytes.backends.{device.type}.ops")
    except ImportError as err:
        raise RuntimeError(f"bitsandbytes has no {device.type} backend here ({err})") from None
    real = getattr(ops, "lib", None)
    if real is None:
        raise RuntimeError(f"bitsandbytes.backends.{device.type}.ops has no compiled library (lib) to count calls of")
    counts: Counter = Counter()

    class _Counting:
        def __getattr__(self, name: str) -> Any:
            value = getattr(real, name)
            if not callable(value):
                return value

            def call(*args: Any, **kwargs: Any) -> Any:
                counts[name] += 1
                return value(*args, **kwargs)

            return call

    ops.lib = _Counting()
    try:
        yield counts
    finally:
        ops.lib = real


def blockwise_calls(counts: Counter) -> tuple[int, int]:
    """(quantise, dequantise) calls of bitsandbytes' blockwise 8-bit kernels among ``counts``."""
    quantise = sum(n for name, n in counts.items() if name.startswith("cquantize_blockwise"))
    dequantise = sum(n for name, n in counts.items() if name.startswith("cdequantize_blockwise"))
    return quantise, dequantise


def _train_fixed_batch(s: GpuCheckSettings, method_name: str, input_ids: torch.Tensor) -> dict[str, Any]:
    """``bnb_steps`` optimizer steps of ``method_name`` on one batch, from the seed-0 weights; the weight change."""
    from megatron_pept.config import MethodConfig, OptimConfig
    from megatron_pept.methods import build_method
    from megatron_pept.models.loss import cross_entropy_loss

    device = input_ids.device
    model = _materialised(s.bnb_model, vocab_size=s.vocab_size, max_seq_len=s.bnb_seq_len, device=device)
    start = [p.detach().clone() for p in model.parameters()]
    method = build_method(
        MethodConfig(name=method_name, rank=s.bnb_rank, update_proj_gap=10 * s.bnb_steps),
        optim_cfg=OptimConfig(lr=1e-3),
        total_steps=s.bnb_steps,
    )
    optimizer = method.build_optimizer(model)
    losses = []
    for _ in range(s.bnb_steps):
        with _autocast(device, s.dtype):
            loss = cross_entropy_loss(model(input_ids[:, :-1]), input_ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad(), _autocast(device, s.dtype):
        losses.append(cross_entropy_loss(model(input_ids[:, :-1]), input_ids[:, 1:]).item())
    delta = torch.cat([(p.detach() - p0).flatten().double() for p, p0 in zip(model.parameters(), start)])
    states = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    uint8_on_device = sum(1 for v in states if v.dtype == torch.uint8 and v.device.type == device.type)
    return {"losses": losses, "delta": delta, "uint8_states_on_device": uint8_on_device}


def galore_8bit_row(s: GpuCheckSettings, *, log: Callable[[str], None]) -> Row:
    device = torch.device(s.device)
    row = Row(id="galore_8bit/step", check=f"galore_8bit step ({device.type})", backend="single")
    if skip_unless_importable(row, "bitsandbytes", install="pip install 'megatron_pept[quant]'"):
        return row
    log("galore_8bit: against galore with fp32 moments")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, s.vocab_size, (s.bnb_batch, s.bnb_seq_len + 1), generator=gen).to(device)
    try:
        ref = _train_fixed_batch(s, "galore", ids)
        with bnb_native_calls(device) as calls:
            q8 = _train_fixed_batch(s, "galore_8bit", ids)
    except Exception as err:
        row.error = _describe_error(err)
        return row
    finally:
        _free(device)
    a, b = q8["delta"], ref["delta"]
    cosine = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))
    norm_ratio = float(a.norm() / b.norm().clamp_min(1e-300))
    loss_drop = q8["losses"][0] - q8["losses"][-1]
    quantised, dequantised = blockwise_calls(calls)
    import bitsandbytes

    row.metrics = {
        "cosine": cosine,
        "norm_ratio": norm_ratio,
        "losses_8bit": q8["losses"],
        "losses_fp32": ref["losses"],
        "uint8_states_on_device": q8["uint8_states_on_device"],
        "bnb_kernel_calls": dict(calls),
        "bitsandbytes": bitsandbytes.__version__,
    }
    row.measured = f"cos {cosine:.4f}, |dW| ratio {norm_ratio:.3f}, loss {q8['losses'][0]:.3f}->{q8['losses'][-1]:.3f}"
    row.checks = [
        (Target(">=", s.bnb_min_cosine, f"cos >= {s.bnb_min_cosine}"), cosine),
        (Target("<=", s.bnb_max_norm_gap, f"|dW| ratio 1+-{s.bnb_max_norm_gap}"), abs(norm_ratio - 1.0)),
        (Target(">", 0.0, "loss falls"), loss_drop),
        (Target(">=", 1, f"uint8 state on {device.type}"), float(q8["uint8_states_on_device"])),
        (Target(">=", 1, f"bitsandbytes {device.type} kernels"), float(min(quantised, dequantised))),
    ]
    row.note = (
        f"{s.bnb_model}, rank {s.bnb_rank}, {s.bnb_steps} steps on one {s.bnb_batch}x{s.bnb_seq_len} batch vs "
        f"galore fp32 moments; {q8['uint8_states_on_device']} uint8 states; {quantised} quantise and {dequantised} "
        f"dequantise calls of bitsandbytes' {device.type} kernels; bitsandbytes {bitsandbytes.__version__}"
    )
    return row
