"""Start a run from a Hugging Face LLaMA folder (``model.init_from``): continued pretraining of a released model,
or ReLoRA / GaLore on top of it.

The folder's ``config.json`` must describe the model this run builds (sizes, heads, vocabulary, RoPE base, norm
epsilon, tied embeddings); a difference is refused in one line that lists the overrides which would match. The
weights are read from safetensors (``model.safetensors`` or the shards of ``model.safetensors.index.json``; never
pickled ``.bin`` files) into the freshly built model before the method initialises its adapters or projections
from them and before the model is sharded, so every method and backend starts from the same weights. Names need no
mapping: our parameters are named as in ``transformers.LlamaForCausalLM``.

The folder is read as untrusted input: a ``config.json`` that is not a JSON object or lacks a field, an index
naming a weight file outside the folder (an absolute path, ``..``, or a symbolic link leading out; a Hugging Face
hub cache snapshot may link into its own ``blobs``), a missing weight file and a damaged or truncated safetensors
file are each refused in one line naming the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_pept.errors import ConfigError
from megatron_pept.models.llama import LlamaArgs
from megatron_pept.safe_paths import outside_reason

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
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: {CONFIG_FILE} holds a JSON {type(cfg).__name__}, not an object of settings")
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ConfigError(f"{where} holds a {model_type!r} model; only LLaMA models (model_type llama) load")
    return cfg


_REQUIRED = object()


def _setting(cfg: dict[str, Any], key: str, kind: type, *, folder: Path, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` as ``kind`` (int: a positive integer; float: a number; bool: true or false); ``default`` when the
    key is missing or null. A missing or ill-typed setting is one line naming it."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"model.init_from={folder}: {CONFIG_FILE} has no {key}; is it a LLaMA config.json?")
        return default
    good = {
        int: isinstance(value, int) and not isinstance(value, bool) and value > 0,
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }[kind]
    if not good:
        what = {int: "a positive integer", float: "a number", bool: "true or false"}[kind]
        raise ConfigError(f"model.init_from={folder}: {CONFIG_FILE} has {key}={json.dumps(value)}, not {what}")
    return kind(value)


def _rope_parameters(cfg: dict[str, Any], *, folder: Path) -> dict[str, Any]:
    """transformers 4.x writes ``rope_theta``; 5.x ``rope_parameters: {rope_type, rope_theta}``."""
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"model.init_from={folder}: {CONFIG_FILE} has rope_parameters that is not an object")
    return params


def check_hf_config(cfg: dict[str, Any], args: LlamaArgs, *, folder: Path) -> None:
    """Refuse, in one line, a folder whose model is not the one this run builds."""
    where = f"model.init_from={folder}"
    params = _rope_parameters(cfg, folder=folder)
    scaling = cfg.get("rope_scaling") or params.get("rope_type", "default")
    if scaling not in (None, "default"):
        raise ConfigError(f"{where} uses RoPE scaling ({scaling}), which this trainer does not implement")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(f"{where}: only SwiGLU (silu) LLaMA blocks without biases load")

    def setting(key: str, kind: type, default: Any = _REQUIRED) -> Any:
        return _setting(cfg, key, kind, folder=folder, default=default)

    hidden, heads = setting("hidden_size", int), setting("num_attention_heads", int)
    if setting("head_dim", int, hidden // heads) * heads != hidden:
        raise ConfigError(f"{where} has a head_dim other than hidden_size / num_attention_heads; not supported")
    rope_theta = _setting(params, "rope_theta", float, folder=folder, default=10000.0)
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


def _root(folder: Path) -> Path:
    """The folder weight files must lie in: the folder itself, or for a Hugging Face hub cache snapshot
    (``models--ORG--NAME/snapshots/REV``, whose files are links to ``../../blobs``) the model's cache folder."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def _weight_file(folder: Path, name: Any, *, named_by: str) -> Path:
    """The file ``name`` (as ``named_by`` gives it) in ``folder``; refused in one line if it is not a plain
    relative name, leads out of the folder through a link, or is not there."""
    where = f"model.init_from={folder}"
    reason = outside_reason(folder, name, link_root=_root(folder))
    if reason is not None and "symlink" not in reason:
        raise ConfigError(
            f"{where}: {named_by} names {json.dumps(name)} as a weight file; only files inside the folder load, "
            "named relative to it"
        )
    path = folder / name
    if reason is not None:
        raise ConfigError(
            f"{where}: {name} is a symbolic link leading out of the folder (to {path.resolve()}); only files inside "
            "the folder load: copy the file into it"
        )
    if not path.is_file():
        raise ConfigError(
            f"{where}: {named_by} names {name}, which is not a file in the folder; download or save the model again"
        )
    return path


@contextmanager
def _reading(folder: Path, file: Path) -> Iterator[None]:
    """A damaged, truncated or lying safetensors file (or an unreadable one) is one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise ConfigError(
            f"model.init_from={folder}: {file.relative_to(folder)} is not a readable safetensors file ({reason}); "
            "download or save the model again"
        ) from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    where = f"model.init_from={folder}"
    if (folder / INDEX_FILE).is_file():
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where}: {INDEX_FILE} is unreadable ({err})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{where}: {INDEX_FILE} has no weight_map object; download or save the model again")
        files = {name: _weight_file(folder, name, named_by=INDEX_FILE) for name in set(weight_map.values())}
        return {tensor: files[name] for tensor, name in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        file = _weight_file(folder, SINGLE_FILE, named_by="the folder")
        with _reading(folder, file), safe_open(str(file), framework="pt") as f:
            return dict.fromkeys(f.keys(), file)
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
        with _reading(folder, file), safe_open(str(file), framework="pt") as f:
            held = set(f.keys())
            for name in names:
                if name not in held:  # only an index can say so
                    raise ConfigError(
                        f"model.init_from={folder}: {INDEX_FILE} puts {name} in {file.relative_to(folder)}, which "
                        "does not hold it; download or save the model again"
                    )
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
