"""Start a run from a Hugging Face LLaMA folder (``model.init_from``): continued pretraining of a released model,
or ReLoRA / GaLore on top of it.

The folder's ``config.json`` must describe the model this run builds (sizes, heads, vocabulary, RoPE base, norm
epsilon, tied embeddings); a difference is refused in one line that lists the overrides which would match. The
weights are read from safetensors (``model.safetensors`` or the shards of ``model.safetensors.index.json``; never
pickled ``.bin`` files) into the freshly built model before the method initialises its adapters or projections
from them, one tensor at a time and, on a backend that shards the model before it is materialised (FSDP2), each
straight into this rank's rows, so every method and backend starts from the same weights. The config check and
the names are the Hugging Face adapter's (:func:`megatron_pept.models.hf.from_hf`); this module reads the folder.

The folder is read as untrusted input: a ``config.json`` that is not a JSON object or lacks a field, an index
naming a weight file outside the folder (an absolute path, ``..``, or a symbolic link leading out; a Hugging Face
hub cache snapshot may link into its own ``blobs``), a missing weight file and a damaged or truncated safetensors
file are each refused in one line naming the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_pept.errors import ConfigError
from megatron_pept.models.hf import from_hf
from megatron_pept.models.init import RowsOf, whole_rows
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


class FolderWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face folder's safetensors files by name, each read from its file when asked for
    (so a model loads one tensor at a time). Which file holds which tensor is read on first use. Close it (or use
    it in a ``with`` block) to release the files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[Path, tuple[Any, set[str]]] = {}

    @cached_property
    def _files(self) -> dict[str, Path]:
        return _weight_files(self.folder)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files[name]
        with _reading(self.folder, file):
            if file not in self._open:
                handle = safe_open(str(file), framework="pt")
                self._open[file] = handle, set(handle.keys())
            handle, held = self._open[file]
            if name not in held:  # only an index can say so
                raise ConfigError(
                    f"model.init_from={self.folder}: {INDEX_FILE} puts {name} in {file.relative_to(self.folder)}, "
                    "which does not hold it; download or save the model again"
                )
            return handle.get_tensor(name)

    def close(self) -> None:
        self._open.clear()  # safetensors releases a file when its handle goes

    def __enter__(self) -> FolderWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def load_hf_weights(
    model: nn.Module,
    folder: str | Path,
    *,
    rows_of: RowsOf = whole_rows,
    within: nn.Module | None = None,
    skip: nn.Module | None = None,
) -> int:
    """Copy the folder's weights into ``model`` (materialised, before the method's ``after_init``); returns how
    many tensors were loaded. Every parameter the Hugging Face model has must be there, with its shape
    (:func:`megatron_pept.models.hf.from_hf` checks the config and the names). One tensor is read at a time and
    only the rows this process holds are kept (``rows_of``: e.g. an FSDP2 row shard's), so loading never holds
    more than the model's own part plus one tensor. ``within`` / ``skip``: only the tensors of that submodule (a
    block initialised on its own) / all but them."""
    folder = Path(folder)
    config = read_hf_config(folder)
    count = 0
    only = model.names_in(within=within, skip=skip)
    with FolderWeights(folder) as weights:
        for name, value in from_hf(config, weights, model.args, where=f"model.init_from={folder}", only=only):
            target = model.get_parameter(name)  # the plain LLaMA's (a method adapts it after this)
            local, start = rows_of(target)
            rows = value[start : start + local.shape[0]] if value.dim() else value
            local.copy_(rows.to(dtype=local.dtype, device=local.device))
            del value, rows  # the next tensor is read only after this one is released
            count += 1
    (logger.info if within is None else logger.debug)("initialised %d tensors from %s", count, folder)
    return count
