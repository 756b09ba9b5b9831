"""Start a run from a Hugging Face LLaMA folder (``model.init_from``): continued pretraining of a released model,
or ReLoRA / GaLore on top of it.

The folder's ``config.json`` must describe the model this run builds (sizes, heads, vocabulary, RoPE base, norm
epsilon, tied embeddings); a difference is refused in one line that lists the overrides which would match. The
weights are read from safetensors (``model.safetensors`` or the shards of ``model.safetensors.index.json``; never
pickled ``.bin`` files) into the freshly built model before the method initialises its adapters or projections
from them and before the model is sharded, so every method and backend starts from the same weights. Names need no
mapping: our parameters are named as in ``transformers.LlamaForCausalLM``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_pept.errors import ConfigError
from megatron_pept.models.llama import LlamaArgs

logger = logging.getLogger("megatron_pept")
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_hf_model_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json beside safetensors weights or their index."""
    return (path / CONFIG_FILE).is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def read_hf_config(folder: Path) -> dict[str, Any]:
    where = f"model.init_from={folder}"
    if not folder.is_dir():
        raise ConfigError(f"{where}: no such folder; give a Hugging Face LLaMA model folder (config.json, safetensors)")
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where} has no {CONFIG_FILE}: is it a Hugging Face model folder?") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: {CONFIG_FILE} is unreadable ({err})") from None
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ConfigError(f"{where} holds a {model_type!r} model; only LLaMA models (model_type llama) load")
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 4.x writes ``rope_theta``; 5.x ``rope_parameters: {rope_type, rope_theta}``."""
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def check_hf_config(cfg: dict[str, Any], args: LlamaArgs, *, folder: Path) -> None:
    """Refuse, in one line, a folder whose model is not the one this run builds."""
    where = f"model.init_from={folder}"
    scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    if scaling not in (None, "default"):
        raise ConfigError(f"{where} uses RoPE scaling ({scaling}), which this trainer does not implement")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(f"{where}: only SwiGLU (silu) LLaMA blocks without biases load")
    heads = int(cfg["num_attention_heads"])
    if int(cfg.get("head_dim") or cfg["hidden_size"] // heads) * heads != int(cfg["hidden_size"]):
        raise ConfigError(f"{where} has a head_dim other than hidden_size / num_attention_heads; not supported")
    theirs = {  # our key -> (their value, ours)
        "model.hidden_size": (int(cfg["hidden_size"]), args.hidden_size),
        "model.num_layers": (int(cfg["num_hidden_layers"]), args.num_layers),
        "model.num_heads": (heads, args.num_heads),
        "model.num_kv_heads": (int(cfg.get("num_key_value_heads") or heads), args.num_kv_heads),
        "model.intermediate_size": (int(cfg["intermediate_size"]), args.intermediate_size),
        "model.vocab_size": (int(cfg["vocab_size"]), args.vocab_size),
        "model.rope_theta": (_rope_theta(cfg), args.rope_theta),
        "model.norm_eps": (float(cfg.get("rms_norm_eps", 1e-6)), args.norm_eps),
        "model.tie_embeddings": (bool(cfg.get("tie_word_embeddings", False)), args.tie_embeddings),
    }
    differ = {key: value for key, (value, ours) in theirs.items() if value != ours}
    if differ:
        have = ", ".join(f"{key}={theirs[key][1]}" for key in differ)
        want = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in differ.items())
        raise ConfigError(f"{where} is not the model this run builds ({have}); set {want}")


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"model.init_from={folder}: {INDEX_FILE} is unreadable ({err})") from None
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / SINGLE_FILE)
    if any(folder.glob("*.bin")):
        raise ConfigError(
            f"model.init_from={folder} holds PyTorch .bin weights only, which are pickled; save it with "
            "save_pretrained(..., safe_serialization=True) to get safetensors"
        )
    raise ConfigError(f"model.init_from={folder} holds no {SINGLE_FILE} or {INDEX_FILE}")


@torch.no_grad()
def load_hf_weights(model: nn.Module, folder: str | Path) -> int:
    """Copy the folder's weights into ``model`` (materialised, before the method's ``after_init``); returns how
    many tensors were loaded. Every parameter the Hugging Face model has must be there, with its shape."""
    from safetensors import safe_open

    folder = Path(folder)
    check_hf_config(read_hf_config(folder), model.args, folder=folder)
    files = _weight_files(folder)
    from megatron_pept.models import build_model

    # The plain LLaMA's parameters (a method's adapters or projections are made from them afterwards).
    plain = [name for name, _ in build_model(model.args, device="meta").named_parameters()]
    targets = {name: model.get_parameter(name) for name in plain}
    if model.args.tie_embeddings:
        targets.pop("lm_head.weight", None)  # shares the embedding's tensor
    missing = [name for name in targets if name not in files]
    if missing:
        raise ConfigError(f"model.init_from={folder} has no tensor {missing[0]} (of {len(missing)} missing)")
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                value = f.get_tensor(name)
                target = targets[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise ConfigError(
                        f"model.init_from={folder}: {name} has shape {list(value.shape)}, this model "
                        f"{list(target.shape)}"
                    )
                target.copy_(value.to(dtype=target.dtype, device=target.device))
    logger.info("initialised %d tensors from %s", len(targets), folder)
    return len(targets)
