"""LLaMA decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Plain PyTorch, nothing distributed. Module and parameter names follow Hugging Face's ``LlamaForCausalLM``
(``model.layers.0.self_attn.q_proj.weight`` ...), so export is a rename-free copy and LoRA/GaLore target patterns
read the same as in the papers' code. Build it on the meta device, parallelise, materialise with ``to_empty``,
then call :meth:`LlamaForCausalLM.init_weights` (each weight from a seed of its own: :mod:`.init`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megatron_pept.errors import ConfigError
from megatron_pept.models.attention import build_core_attention
from megatron_pept.models.init import RowsOf, fill_normal_rows_, seed_from, whole_rows


@dataclass(frozen=True)
class LlamaArgs:
    """Shape and numerics of one LLaMA model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "change model.hidden_size or model.num_heads"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dimension {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Parameter count of the full-rank model."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o + k, v
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + h + head + (embed if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + attention scores (PaLM, appendix B)."""
        matmul_params = self.num_params(include_embedding=False) - (2 * self.num_layers + 1) * self.hidden_size
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.hidden_size
        return 6.0 * matmul_params + 12.0 * self.num_layers * self.hidden_size * seq_len


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as LLaMA and transformers do)."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(
    *, head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_seq_len, head_dim // 2]`` of the rotary embedding, in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    positions = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_bshd: torch.Tensor, cos_sd: torch.Tensor, sin_sd: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (the 'rotate_half' layout of LLaMA checkpoints in HF format)."""
    half = x_bshd.shape[-1] // 2
    x1, x2 = x_bshd[..., :half].float(), x_bshd[..., half:].float()
    cos, sin = cos_sd[:, None, :], sin_sd[:, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x_bshd.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        kv_dim = args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.core = build_core_attention(
            args.attention, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim
        )

    def forward(self, x_bsd: torch.Tensor, cos_sd: torch.Tensor, sin_sd: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_bsd.shape
        q = self.q_proj(x_bsd).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x_bsd).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_bsd).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos_sd, sin_sd), apply_rope(k, cos_sd, sin_sd)
        out = self.core(q, k, v)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos_sd: torch.Tensor, sin_sd: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sd, sin_sd)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``LlamaModel``)."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # A ModuleDict keyed "0", "1", ... keeps HF's parameter names and lets FSDP wrap layers by name.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args) for i in range(args.num_layers)})
        self.norm = RMSNorm(args.hidden_size, eps=args.norm_eps)
        # Rotary tables are derived, not learned: non-persistent so checkpoints and exports omit them.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        # Recompute each block's activations during backward instead of keeping them (train.activation_checkpointing).
        self.activation_checkpointing = False

    def _apply(self, fn, recurse=True):
        # The rotary tables follow the module to another device but stay fp32 under any cast (module.bfloat16() in
        # DeepSpeed's bf16 mode, .half(), .to(dtype)): in bf16 cos/sin are off by up to 2^-9 at every position.
        tables = {name: self._buffers[name] for name in ("rope_cos", "rope_sin")}
        out = super()._apply(fn, recurse)
        for name, before in tables.items():
            after = self._buffers[name]
            if after is not None and before is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return out

    def forward(self, input_ids_bs: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids_bs.shape[1]
        if seq_len > self.args.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens exceeds the model's max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x = self.embed_tokens(input_ids_bs)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers.values():
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The language model: :class:`LlamaModel` plus the output projection ``lm_head``."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids_bs: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for next-token prediction."""
        return self.lm_head(self.model(input_ids_bs))

    def tie_weights(self) -> None:
        """Re-share the embedding with the LM head (``to_empty`` gives each module its own tensor)."""
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_rope(self) -> None:
        cos, sin = rope_cos_sin(
            head_dim=self.args.head_dim,
            max_seq_len=self.args.max_seq_len,
            theta=self.args.rope_theta,
            device=self.model.rope_cos.device,
        )
        self.model.rope_cos.copy_(cos)
        self.model.rope_sin.copy_(sin)

    def init_std(self, name: str) -> float | None:
        """The standard deviation of the N(0, std) initial values of the plain LLaMA weight ``name`` (HF-style), or
        None for a weight that starts at ones (the RMSNorm gains).

        Normal(0, init_std) for embeddings and projections; the projections that write into the residual stream
        (o_proj, down_proj) use init_std / sqrt(2 * num_layers) so the residual variance stays bounded with depth
        (GPT-2 / Megatron)."""
        if name.endswith("norm.weight"):
            return None
        leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if leaf in ("o_proj", "down_proj"):
            return self.args.init_std / math.sqrt(2 * self.args.num_layers)
        return self.args.init_std

    def initial_weights(self) -> list[tuple[str, nn.Parameter]]:
        """The plain LLaMA weights :meth:`init_weights` sets, by name: every RMSNorm gain, the embedding, each
        projection's ``weight`` (a method's adapter layer included, while it holds a dense weight) and the LM
        head unless it is tied. Other parameters (adapters) are the method's to initialise."""
        out = []
        for name, module in self.named_modules():
            weight = (
                module._parameters.get("weight") if isinstance(module, (RMSNorm, nn.Embedding, nn.Linear)) else None
            )
            if weight is None or (self.args.tie_embeddings and name == "lm_head"):
                continue
            out.append((f"{name}.weight", weight))
        return out

    def names_in(
        self, *, within: nn.Module | None = None, skip: nn.Module | None = None
    ) -> Callable[[str], bool] | None:
        """Which tensor names (ours, e.g. ``model.layers.0.mlp.up_proj.weight``) lie inside submodule ``within`` and
        outside ``skip``; None when neither is given. By name, not by tensor: a block a method has converted since
        (a quantised base) no longer holds the weight its name stood for."""
        if within is None and skip is None:
            return None
        prefixes = {id(m): f"{n}." for n, m in self.named_modules()}
        inside = prefixes[id(within)] if within is not None else ""
        leave = prefixes[id(skip)] if skip is not None else None
        return lambda name: name.startswith(inside) and not (leave and name.startswith(leave))

    @torch.no_grad()
    def init_weights(
        self,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        rows_of: RowsOf = whole_rows,
        within: nn.Module | None = None,
        skip: nn.Module | None = None,
    ) -> None:
        """Initialise every plain LLaMA weight (:meth:`initial_weights`, by :meth:`init_std`) and the rotary
        tables in place, each weight from a seed of its own derived from ``seed`` and its name
        (:mod:`megatron_pept.models.init`): the values do not depend on the order, on what else the model holds,
        or on how a weight is sharded. ``rows_of`` says which rows of a weight this process holds (an FSDP2 row
        shard fills only its rows). ``generator`` (the older interface) draws the seed when ``seed`` is None.
        ``within``: only the weights of that submodule (a block initialised on its own; not the rotary tables);
        ``skip``: all but that submodule's weights."""
        if seed is None:
            seed = seed_from(generator) if generator is not None else 0
        if within is None:
            self.tie_weights()
            self.init_rope()
        only = self.names_in(within=within, skip=skip)
        for name, weight in self.initial_weights():
            if only is not None and not only(name):
                continue
            local, start = rows_of(weight)
            std = self.init_std(name)
            if std is None:
                local.fill_(1.0)
            else:
                fill_normal_rows_(local, start=start, shape=weight.shape, name=name, seed=seed, std=std)
