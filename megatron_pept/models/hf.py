"""The Hugging Face view of our model: ``LlamaConfig`` fields and a transformers twin with the same weights.

Parameter names already match ``transformers.LlamaForCausalLM``, so weights copy over without renaming.
transformers is imported only inside :func:`to_hf_model` (it is a dev/export dependency).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megatron_pept.errors import UserError
from megatron_pept.models.llama import LlamaArgs

# The context an export declares when model.max_position_embeddings is null: LLaMA's, and that of the papers'
# named sizes (ReLoRA, GaLore); a longer data.seq_len wins.
DEFAULT_CONTEXT = 2048


def declared_context(max_position_embeddings: int | None, seq_len: int, *, source: str, fix: str) -> int:
    """``max_position_embeddings`` of an export: the configured value, else the larger of 2048 and ``seq_len``.
    A value shorter than the ``seq_len`` the model was trained on is refused in one line naming ``source`` (the
    setting it came from) and ``fix`` (what to do)."""
    if max_position_embeddings is None:
        return max(DEFAULT_CONTEXT, seq_len)
    if max_position_embeddings < seq_len:
        raise UserError(
            f"{source} is {max_position_embeddings}, shorter than the {seq_len}-token sequences the model was "
            f"trained on (data.seq_len); {fix}"
        )
    return max_position_embeddings


def hf_config_dict(args: LlamaArgs, *, max_position_embeddings: int | None = None) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments describing ``args`` (the content of an export's config.json, which
    :func:`megatron_pept.checkpoint.hf_export.export_to_hf` completes with the keys of both transformers lines).
    ``max_position_embeddings``: the context to declare (default ``args.max_seq_len``, the training length)."""
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        hidden_act="silu",
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=max_position_embeddings or args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=args.init_std,
    )


def to_hf_model(model: nn.Module, *, attn_implementation: str = "sdpa", use_cache: bool = False) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` of the same shape, on the same device, holding a copy of the weights."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            "this needs the transformers package: pip install 'megatron_pept[hf]' (or pip install transformers)"
        ) from None
    hf_cfg = transformers.LlamaConfig(
        **hf_config_dict(model.args), use_cache=use_cache, attn_implementation=attn_implementation
    )
    with torch.device(next(model.parameters()).device):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return hf
