"""Reading a checkpoint outside training: its metadata, and whole (unsharded) tensors on CPU for export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_pept.checkpoint import safe_dcp, store
from megatron_pept.errors import UserError


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` ({} when it has none); one clear error when it is not a JSON object."""
    meta = path / store.META
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta} is unreadable ({err}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{meta} is not a JSON object; the checkpoint is damaged")
    return data


def load_full_tensors(path: Path, *, prefix: str) -> dict[str, torch.Tensor]:
    """Every saved tensor whose key starts with ``prefix`` (prefix removed), whole, on CPU, from the DCP shards
    of any number of ranks. Under DeepSpeed checkpoints the model comes from DeepSpeed's own files instead."""
    state_dir = path / "state"
    if not (state_dir / ".metadata").is_file():
        raise UserError(
            f"{path} has no DCP state folder (a DeepSpeed checkpoint? export it with megatron-pept-convert-to-hf, "
            "tools/convert_to_hf.py in a checkout)"
        )
    metadata = safe_dcp.read_metadata(state_dir)  # never plain pickle: see safe_dcp
    out = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    if not out:
        raise UserError(f"{path} holds no tensors under {prefix!r}")
    safe_dcp.load(out, state_dir, metadata=metadata)
    return {key[len(prefix) :]: value for key, value in out.items()}
