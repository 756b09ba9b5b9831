"""The 'control' baseline of ReLoRA Table 2: a full-rank model with as many parameters as a low-rank run trains.

:func:`control_shape` keeps the low-rank model's depth, searches the width in steps of 8 (with heads of about
the original head size) and sets the SwiGLU width to 8/3 of it rounded up to a multiple of 16 (as the papers'
configs do), picking the model whose parameter count is closest to the low-rank run's trainable count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_pept.config import MethodConfig, ModelConfig, OptimConfig
from megatron_pept.methods import build_method, method_class
from megatron_pept.models import build_model, llama_args
from megatron_pept.models.llama import LlamaArgs


def trainable_parameters(model_cfg: ModelConfig, method_cfg: MethodConfig, *, vocab_size: int) -> tuple[int, int]:
    """(trainable, total) parameter counts of a run, counted on the meta device (no memory, no init).

    The low-rank phase is counted even when the run starts with a full-rank warm start.
    """
    if "warm_start_steps" in method_class(method_cfg.name).config_keys:
        method_cfg = method_cfg.with_options(warm_start_steps=0)
    method = build_method(method_cfg, optim_cfg=OptimConfig(), total_steps=1)
    model = build_model(llama_args(model_cfg, vocab_size=vocab_size))
    method.convert(model)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ControlShape:
    args: LlamaArgs
    target_params: int

    @property
    def params(self) -> int:
        return self.args.num_params()

    @property
    def relative_error(self) -> float:
        return self.params / self.target_params - 1.0

    def overrides(self) -> list[str]:
        a = self.args
        return [
            f"model.hidden_size={a.hidden_size}",
            f"model.num_heads={a.num_heads}",
            f"model.num_kv_heads={a.num_kv_heads}",
            f"model.intermediate_size={a.intermediate_size}",
            f"model.num_layers={a.num_layers}",
        ]


def swiglu_width(hidden_size: int) -> int:
    return int(math.ceil(8 * hidden_size / 3 / 16) * 16)


def control_shape(model_cfg: ModelConfig, *, target_params: int, vocab_size: int) -> ControlShape:
    """The full-rank shape (same depth, heads of about the same size) whose parameter count is closest to
    ``target_params``; widths are searched in steps of 8."""
    ref = llama_args(model_cfg, vocab_size=vocab_size)
    best: ControlShape | None = None
    for hidden in range(8, 4 * ref.hidden_size + 1, 8):
        # the head count whose (even) head size is closest to the reference model's
        options = [h for h in range(1, hidden // 2 + 1) if hidden % h == 0 and (hidden // h) % 2 == 0]
        heads = min(options, key=lambda h: abs(hidden // h - ref.head_dim))
        kv = max(1, heads * ref.num_kv_heads // ref.num_heads)
        while heads % kv:
            kv -= 1
        args = replace(
            ref, hidden_size=hidden, num_heads=heads, num_kv_heads=kv, intermediate_size=swiglu_width(hidden)
        )
        candidate = ControlShape(args=args, target_params=target_params)
        if best is None or abs(candidate.relative_error) < abs(best.relative_error):
            best = candidate
    assert best is not None
    return best
