"""Causal attention kernels behind one interface: ``core(q_bshd, k_bshd, v_bshd) -> out_bshd``.

``sdpa`` (torch's scaled_dot_product_attention) runs everywhere and is the default. ``flash`` (flash-attn 2) and
``te`` (transformer-engine) are GPU-only extras, imported only when chosen; asking for one that is not installed
is a one-line error naming the extra.

A kernel keeps no weights, and its modules save nothing: transformer-engine's ``DotProductAttention`` (a TE module
since TE 1.8) puts its FP8 metadata into ``state_dict()`` as ``..._extra_state``, a pickle that its
``set_extra_state`` unpickles on load. :class:`TransformerEngineAttention` leaves that key out of the state dict and
drops it from any state dict it is given (an old checkpoint's included) before TE could read it, so a ``te`` run's
checkpoints hold weights only, resume under any backend, and never run a checkpoint's pickle. (This stack never
runs TE's attention in FP8, so that metadata is never needed.)
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_pept.config import GPU_ATTENTION
from megatron_pept.errors import ConfigError

ATTENTION_BACKENDS = ("sdpa", "flash", "te")
# The key suffix under which torch saves a module's get_extra_state() (torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX).
EXTRA_STATE_SUFFIX = "_extra_state"


def is_kernel_state(key: str) -> bool:
    """Whether a state-dict key is a module's extra state (a kernel's bookkeeping, not a weight)."""
    return key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


def keep_weights_only(module: nn.Module) -> None:
    """Make ``module`` save and load no extra state of the modules inside it: their ``..._extra_state`` keys are
    left out of its ``state_dict()``, dropped unread from a state dict it loads, and not reported missing (so strict
    loads of weights-only state dicts pass)."""
    loading: list[str] = []  # the prefix of the load in progress (the post-hook is not given it)

    def drop_saved(mod: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state if k.startswith(prefix) and is_kernel_state(k)]:
            del state[key]

    def drop_loaded(mod: nn.Module, state: dict, prefix: str, *args: object) -> None:
        loading[:] = [prefix]
        for key in [k for k in state if k.startswith(prefix) and is_kernel_state(k)]:
            del state[key]  # before the inner module's set_extra_state could unpickle it

    def not_missing(mod: nn.Module, incompatible: Any) -> None:
        prefix = loading[0] if loading else ""
        missing = incompatible.missing_keys
        missing[:] = [k for k in missing if not (k.startswith(prefix) and is_kernel_state(k))]

    module.register_state_dict_post_hook(drop_saved)
    module.register_load_state_dict_pre_hook(drop_loaded)
    module.register_load_state_dict_post_hook(not_missing)


def _import_optional(module: str, *, backend: str, package: str) -> object:
    try:
        return importlib.import_module(module)
    except Exception as err:  # transformer-engine raises RuntimeError, not ImportError, without CUDA
        raise ConfigError(
            f"model.attention={backend} needs the {package} package, which failed to import ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}); install it with "
            "pip install 'megatron_pept[gpu]' on a CUDA machine, or use model.attention=sdpa"
        ) from None


ATTENTION_MODULES = {"flash": "flash_attn", "te": "transformer_engine.pytorch"}
"""The module each GPU attention kernel imports (its package: :data:`megatron_pept.config.GPU_ATTENTION`)."""


def import_attention_package(backend: str) -> object:
    """The module ``model.attention=backend`` (flash or te) needs, or a ConfigError naming the extra."""
    return _import_optional(ATTENTION_MODULES[backend], backend=backend, package=GPU_ATTENTION[backend])


class SDPAAttention(nn.Module):
    def __init__(self, *, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.gqa = num_kv_heads != num_heads

    def forward(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return out.transpose(1, 2)


class FlashAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._flash_attn_func = import_attention_package("flash").flash_attn_func

    def forward(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> torch.Tensor:
        if not q_bshd.is_cuda or q_bshd.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("model.attention=flash runs on CUDA in bf16/fp16 only; use train.dtype=bf16 on a GPU")
        # flash-attn takes [batch, seq, heads, dim] and handles fewer kv heads natively.
        return self._flash_attn_func(q_bshd, k_bshd, v_bshd, causal=True)


class TransformerEngineAttention(nn.Module):
    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        te = import_attention_package("te")
        self.inner = te.DotProductAttention(
            num_heads,
            head_dim,
            num_gqa_groups=num_kv_heads,
            attn_mask_type="causal",
            qkv_format="bshd",
            attention_dropout=0.0,
        )
        keep_weights_only(self)  # TE's FP8 metadata: a pickle, and no weight (see the module docstring)

    def forward(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> torch.Tensor:
        b, s, h, d = q_bshd.shape
        return self.inner(q_bshd, k_bshd, v_bshd).view(b, s, h, d)


def build_core_attention(backend: str, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
    if backend == "sdpa":
        return SDPAAttention(num_heads=num_heads, num_kv_heads=num_kv_heads)
    if backend == "flash":
        return FlashAttention()
    if backend == "te":
        return TransformerEngineAttention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    raise ConfigError(f"unknown model.attention '{backend}'; choose one of {', '.join(ATTENTION_BACKENDS)}")
