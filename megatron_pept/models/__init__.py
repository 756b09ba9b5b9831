"""Model definitions and the named sizes."""

from __future__ import annotations

import torch

from megatron_pept.config import ModelConfig
from megatron_pept.models.llama import LlamaArgs, LlamaForCausalLM

# Shapes: ReLoRA Table 1 for 60m ... 350m (with the SwiGLU widths of its released configs), GaLore's LLaMA 1B and
# LLaMA 7B. `debug` is the test model: 2 layers, width 64, grouped-query attention (4 query heads, 2 kv heads).
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "debug": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176),
    "60m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1376),
    "130m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048),
    "250m": dict(hidden_size=768, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2560),
    "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2736),
    "1b": dict(hidden_size=2048, num_layers=24, num_heads=32, num_kv_heads=32, intermediate_size=5461),
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008),
}
DEFAULT_VOCAB_SIZE = 32000  # the T5/LLaMA vocabulary the papers' C4 runs use


def llama_args(cfg: ModelConfig, *, vocab_size: int | None = None, max_seq_len: int = 2048) -> LlamaArgs:
    """Resolve a named size plus per-field overrides into model arguments.

    ``vocab_size`` (from the data's tokenizer) is used when the config leaves ``model.vocab_size`` null.
    """
    shape = dict(MODEL_SHAPES[cfg.name])
    for key in shape:
        override = getattr(cfg, key)
        if override is not None:
            shape[key] = override
    if cfg.num_heads is not None and cfg.num_kv_heads is None:
        shape["num_kv_heads"] = cfg.num_heads  # changing the head count alone keeps plain multi-head attention
    vocab = cfg.vocab_size or vocab_size or DEFAULT_VOCAB_SIZE
    return LlamaArgs(
        vocab_size=vocab,
        max_seq_len=max_seq_len,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings,
        init_std=cfg.init_std,
        attention=cfg.attention,
        **shape,
    )


def build_model(args: LlamaArgs, *, device: torch.device | str = "meta") -> LlamaForCausalLM:
    """Construct the model on ``device`` (meta by default: no memory, no initialisation)."""
    with torch.device(device):
        return LlamaForCausalLM(args)


__all__ = ["MODEL_SHAPES", "LlamaArgs", "LlamaForCausalLM", "build_model", "llama_args"]
