"""The one Hugging Face adapter: our LLaMA as transformers' ``LlamaForCausalLM`` and back, weights and config.

:func:`to_hf` gives the ``LlamaConfig`` fields and the state dict a plain ``transformers.LlamaForCausalLM`` of the
same shape loads with ``strict=True``; :func:`from_hf` checks a Hugging Face ``config.json`` against the model this
run builds (one line naming the overrides that would match) and yields the weights under our names. The HF export
(:mod:`megatron_pept.checkpoint.hf_export`), ``model.init_from`` (:mod:`megatron_pept.models.hf_import`), the
benchmark and the tests that compare with transformers all go through them.

Only weights cross: exactly the parameters transformers' model has (``lm_head.weight`` is the embedding's tensor
when tied), never an attention kernel's state (transformer-engine's ``..._extra_state``), the rotary tables (derived
from the config) or a method's tensors (which :meth:`~megatron_pept.methods.base.Method.export_weights` merges
first). Parameter names already match, so nothing is renamed. The attention kernel (``model.attention``) is no
Hugging Face setting: any kernel's weights are the same. transformers is imported only inside
:func:`to_hf_model` (it is a dev/export dependency).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from megatron_pept.errors import ConfigError, UserError
from megatron_pept.models.attention import is_kernel_state
from megatron_pept.models.llama import LlamaArgs, LlamaForCausalLM

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


def hf_state_shapes(args: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the ``state_dict()`` of transformers' ``LlamaForCausalLM`` of this shape: those of our
    plain model, whose parameter names are transformers' (``lm_head.weight`` included when tied: the shared tensor
    is listed under both names, though ``save_pretrained`` writes it once). Neither has a persistent buffer (our
    rotary tables and transformers' ``inv_freq`` are not saved). Built on the meta device with SDPA (a kernel holds
    no weight), so nothing is allocated and no kernel package is imported."""
    with torch.device("meta"):
        plain = LlamaForCausalLM(dataclasses.replace(args, attention="sdpa"))
    return {name: tuple(value.shape) for name, value in plain.state_dict().items()}


# Buffers of ours that are derived from the config, not learned (non-persistent, so only a state dict taken with
# other means holds them).
_DERIVED = ("model.rope_cos", "model.rope_sin")


def to_hf(
    args: LlamaArgs, state: Mapping[str, torch.Tensor], *, max_position_embeddings: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our model as transformers' ``LlamaForCausalLM``: ``(config, state_dict)``, the ``LlamaConfig`` keyword
    arguments (:func:`hf_config_dict`) and the tensors of ``state`` (our model's ``state_dict`` or a method's
    :meth:`~megatron_pept.methods.base.Method.export_weights`) under exactly the keys of its ``state_dict``
    (:func:`hf_state_shapes`; tied: ``lm_head.weight`` is the embedding's tensor), not copied.

    An attention kernel's extra state and the rotary tables are dropped; any other tensor a plain LLaMA has not (a
    method's adapter, not merged), a missing weight or a weight of another shape is a ``ValueError``."""
    shapes = hf_state_shapes(args)
    extra = [k for k in state if k not in shapes and k not in _DERIVED and not is_kernel_state(k)]
    if extra:
        raise ValueError(
            f"the state holds {extra[0]} (of {len(extra)} such), which a plain LLaMA has not: give the weights a "
            "method exports (Method.export_weights: adapters merged)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        source = "model.embed_tokens.weight" if args.tie_embeddings and name == "lm_head.weight" else name
        if source not in state:
            raise ValueError(f"the state has no {source}, a weight of every LLaMA")
        value = state[source]
        if tuple(value.shape) != shape:
            raise ValueError(f"the state's {source} has shape {list(value.shape)}, the model {list(shape)}")
        out[name] = value
    return hf_config_dict(args, max_position_embeddings=max_position_embeddings), out


def from_hf(
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    args: LlamaArgs,
    *,
    where: str,
    only: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a Hugging Face LLaMA (its ``config.json`` as a dict, and its tensors: a dict or a mapping that
    reads each on access) as ``(our name, tensor)`` pairs for the model ``args`` builds, one tensor at a time.

    Checked first, each refused in one line beginning with ``where`` (e.g. ``model.init_from=FOLDER``): a config
    describing another model (:func:`check_hf_config`: the overrides that would match), a missing weight; then, as
    each is read, a weight of another shape. When tied, only the embedding is read (``lm_head.weight`` shares it);
    tensors no plain LLaMA has (a stale rotary ``inv_freq``, a kernel's state) are ignored. ``only``: read just the
    weights it accepts (by our name; every one is still checked to be there)."""
    check_hf_config(config, args, where=where)
    wanted = hf_state_shapes(args)
    if args.tie_embeddings:
        del wanted["lm_head.weight"]
    missing = [name for name in wanted if name not in state]
    if missing:
        raise ConfigError(f"{where} has no tensor {missing[0]} (of {len(missing)} missing)")

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in wanted.items():
            if only is not None and not only(name):
                continue
            value = state[name]
            if tuple(value.shape) != shape:
                raise ConfigError(f"{where}: {name} has shape {list(value.shape)}, this model {list(shape)}")
            yield name, value  # the names are ours already
            del value  # released before the next is read: one tensor at a time

    return weights()


# -- checking a Hugging Face config against our model ---------------------------------------------------------------

_REQUIRED = object()


def _setting(cfg: Mapping[str, Any], key: str, kind: type, *, where: str, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` as ``kind`` (int: a positive integer; float: a number; bool: true or false); ``default`` when the
    key is missing or null. A missing or ill-typed setting is one line naming it."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: config.json has no {key}; is it a LLaMA config.json?")
        return default
    good = {
        int: isinstance(value, int) and not isinstance(value, bool) and value > 0,
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }[kind]
    if not good:
        what = {int: "a positive integer", float: "a number", bool: "true or false"}[kind]
        raise ConfigError(f"{where}: config.json has {key}={json.dumps(value)}, not {what}")
    return kind(value)


def check_hf_config(cfg: Mapping[str, Any], args: LlamaArgs, *, where: str) -> None:
    """Refuse, in one line beginning with ``where``, a Hugging Face config whose model is not the one ``args``
    describes (sizes, heads, vocabulary, RoPE base, norm epsilon, tied embeddings: naming the overrides that would
    match), or one this model cannot compute (RoPE scaling, biases, another activation, another head_dim)."""
    params = cfg.get("rope_parameters") or {}  # transformers 4.x writes rope_theta; 5.x {rope_type, rope_theta}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: config.json has rope_parameters that is not an object")
    scaling = cfg.get("rope_scaling") or params.get("rope_type", "default")
    if scaling not in (None, "default"):
        raise ConfigError(f"{where} uses RoPE scaling ({scaling}), which this trainer does not implement")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(f"{where}: only SwiGLU (silu) LLaMA blocks without biases load")

    def setting(key: str, kind: type, default: Any = _REQUIRED) -> Any:
        return _setting(cfg, key, kind, where=where, default=default)

    hidden, heads = setting("hidden_size", int), setting("num_attention_heads", int)
    if setting("head_dim", int, hidden // heads) * heads != hidden:
        raise ConfigError(f"{where} has a head_dim other than hidden_size / num_attention_heads; not supported")
    rope_theta = _setting(params, "rope_theta", float, where=where, default=10000.0)
    theirs = {  # our key -> (their value, ours)
        "model.hidden_size": (hidden, args.hidden_size),
        "model.num_layers": (setting("num_hidden_layers", int), args.num_layers),
        "model.num_heads": (heads, args.num_heads),
        "model.num_kv_heads": (setting("num_key_value_heads", int, heads), args.num_kv_heads),
        "model.intermediate_size": (setting("intermediate_size", int), args.intermediate_size),
        "model.vocab_size": (setting("vocab_size", int), args.vocab_size),
        "model.rope_theta": (setting("rope_theta", float, rope_theta), args.rope_theta),
        "model.norm_eps": (setting("rms_norm_eps", float, 1e-6), args.norm_eps),
        "model.tie_embeddings": (setting("tie_word_embeddings", bool, False), args.tie_embeddings),
    }
    differ = {key: value for key, (value, ours) in theirs.items() if value != ours}
    if differ:
        have = ", ".join(f"{key}={theirs[key][1]}" for key in differ)
        want = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in differ.items())
        raise ConfigError(f"{where} is not the model this run builds ({have}); set {want}")


# -- a transformers twin ----------------------------------------------------------------------------------------------


def to_hf_model(model: nn.Module, *, attn_implementation: str = "sdpa", use_cache: bool = False) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` of the same shape, on the same device, holding a copy of the weights
    (:func:`to_hf` of ``model.state_dict()``; ``model`` is a plain LLaMA, with any attention kernel)."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            "this needs the transformers package: pip install 'megatron_pept[hf]' (or pip install transformers)"
        ) from None
    config, state = to_hf(model.args, model.state_dict())
    hf_cfg = transformers.LlamaConfig(**config, use_cache=use_cache, attn_implementation=attn_implementation)
    with torch.device(next(model.parameters()).device):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(state, strict=True)
    return hf
