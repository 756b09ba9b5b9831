"""Attention-kernel rows of the GPU check: logits of the ``flash`` and ``te`` backends against ``sdpa`` on the same
weights and batch (the ``1b`` model, one sequence of 2048 tokens, bf16 autocast; the same model object with its
attention kernels swapped). Pass bound: twice the bf16 error of ``sdpa`` itself (its bf16 logits against its fp32
logits), and at least 2 bf16 ulps of the largest logit. The kernels are also compared directly on unit-normal
q/k/v (same bound against the fp32 ``sdpa`` output), which a masking or layout bug cannot pass. A kernel whose
module does not import (``flash_attn``; ``transformer_engine.pytorch``, the module the ``te`` backend uses, not the
top-level package) is a SKIP row saying why; the other kernel's row is measured all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_pept.bench.gpu_check.harness import _autocast, _describe_error, _free, _materialised, unavailable
from megatron_pept.bench.gpu_check.settings import GpuCheckSettings
from megatron_pept.bench.gpu_check.verdicts import Row, Target, bf16_bound

ATTENTION_PACKAGES = {"flash": "flash_attn", "te": "transformer_engine.pytorch"}
"""The module each kernel imports (megatron_pept.models.attention): the row is measured only when it imports."""


def _swap_cores(model: Any, backend: str) -> list[Any]:
    """Give every attention layer a ``backend`` kernel; returns the kernels it had, for :func:`_restore_cores`."""
    from megatron_pept.models.attention import build_core_attention

    args = model.args
    old = []
    for layer in model.model.layers.values():
        old.append(layer.self_attn.core)
        core = build_core_attention(
            backend, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim
        )
        layer.self_attn.core = core.to(model.lm_head.weight.device)
    return old


def _restore_cores(model: Any, cores: list[Any]) -> None:
    for layer, core in zip(model.model.layers.values(), cores):
        layer.self_attn.core = core


@torch.no_grad()
def attention_references(model: Any, input_ids: torch.Tensor, *, dtype: str) -> dict[str, Any]:
    """What the other kernels are compared with: ``sdpa`` logits in ``dtype`` and in fp32, the same for one
    attention call on unit-normal q/k/v, and the bf16 error of each."""
    device = input_ids.device
    logits32 = model(input_ids).float()
    with _autocast(device, dtype):
        logits = model(input_ids).float()
    args = model.args
    b, s = input_ids.shape
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(b, s, heads, args.head_dim, generator=gen).to(device)
        for heads in (args.num_heads, args.num_kv_heads, args.num_kv_heads)
    )
    core = model.model.layers["0"].self_attn.core
    kernel32 = core(q, k, v).float()
    low = torch.bfloat16 if dtype == "bf16" else torch.float32
    qkv = tuple(t.to(low) for t in (q, k, v))
    kernel = core(*qkv).float()
    return {
        "logits": logits,
        "logits32": logits32,
        "logits_noise": (logits - logits32).abs().max().item(),
        "qkv": qkv,
        "kernel32": kernel32,
        "kernel_noise": (kernel - kernel32).abs().max().item(),
    }


@torch.no_grad()
def compare_attention_backend(
    model: Any, input_ids: torch.Tensor, *, backend: str, refs: dict[str, Any], dtype: str
) -> dict[str, float]:
    """Largest absolute differences of ``backend``'s logits from ``sdpa``'s (same model, same batch, same
    ``dtype``) and of its kernel output from fp32 ``sdpa``'s, with the bf16 pass bounds of each."""
    old = _swap_cores(model, backend)
    try:
        with _autocast(input_ids.device, dtype):
            logits = model(input_ids).float()
        kernel = model.model.layers["0"].self_attn.core(*refs["qkv"]).float()
    finally:
        _restore_cores(model, old)
    return {
        "logits_max_abs_diff": (logits - refs["logits"]).abs().max().item(),
        "logits_bound": bf16_bound(refs["logits_noise"], refs["logits32"].abs().max().item()),
        "logits_sdpa_bf16_error": refs["logits_noise"],
        "kernel_max_abs_diff": (kernel - refs["kernel32"]).abs().max().item(),
        "kernel_bound": bf16_bound(refs["kernel_noise"], refs["kernel32"].abs().max().item()),
        "kernel_sdpa_bf16_error": refs["kernel_noise"],
    }


def attention_rows(s: GpuCheckSettings, *, log: Callable[[str], None]) -> list[Row]:
    device = torch.device(s.device)
    rows = [
        Row(id=f"attention/{backend}", check=f"attention {backend} vs sdpa", backend="-")
        for backend in ATTENTION_PACKAGES
    ]
    why = {b: unavailable(m) for b, m in ATTENTION_PACKAGES.items()}
    missing = {b: why[b] is not None for b in ATTENTION_PACKAGES}
    for row, backend in zip(rows, ATTENTION_PACKAGES):
        if why[backend] == "not installed":
            row.skipped = f"not installed ({ATTENTION_PACKAGES[backend]}; pip install 'megatron_pept[gpu]')"
            row.measured = "not installed"
        elif why[backend] is not None:
            row.skipped = f"{why[backend]}; pip install 'megatron_pept[gpu]' on a CUDA machine"
            row.measured = "does not import"
    if all(missing.values()):
        return rows
    log("attention: sdpa references")
    model = None
    try:
        model = _materialised(s.model, vocab_size=s.vocab_size, max_seq_len=s.attention_seq_len, device=device)
        model.eval()
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, s.vocab_size, (s.attention_batch, s.attention_seq_len), generator=gen).to(device)
        refs = attention_references(model, ids, dtype=s.dtype)
    except Exception as err:
        error = _describe_error(err)
        for row, backend in zip(rows, ATTENTION_PACKAGES):
            row.error = None if missing[backend] else f"sdpa reference: {error}"
        del model
        _free(device)
        return rows
    try:
        for row, backend in zip(rows, ATTENTION_PACKAGES):
            if missing[backend]:
                continue
            log(f"attention: {backend}")
            try:
                result = compare_attention_backend(model, ids, backend=backend, refs=refs, dtype=s.dtype)
            except Exception as err:
                if s.dry_run:  # installed but unusable on CPU (flash-attn needs CUDA): nothing to check here
                    row.skipped = f"cannot run on CPU: {_describe_error(err)}"
                    row.measured = "needs CUDA"
                else:
                    row.error = _describe_error(err)
                continue
            row.metrics = result
            row.measured = (
                f"logits max|diff| {result['logits_max_abs_diff']:.3g} (kernel {result['kernel_max_abs_diff']:.3g})"
            )
            logits_target = Target("<=", result["logits_bound"], f"logits <= {result['logits_bound']:.3g}")
            kernel_target = Target("<=", result["kernel_bound"], f"kernel <= {result['kernel_bound']:.3g}")
            row.checks = [
                (logits_target, result["logits_max_abs_diff"]),
                (kernel_target, result["kernel_max_abs_diff"]),
            ]
            row.note = (
                f"{s.model}, {s.attention_batch}x{s.attention_seq_len} tokens, {s.dtype}; bound 2x sdpa's own bf16 "
                f"error ({result['logits_sdpa_bf16_error']:.3g} logits, {result['kernel_sdpa_bf16_error']:.3g} kernel)"
            )
    finally:
        del model
        _free(device)
    return rows
