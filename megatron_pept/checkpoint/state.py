"""What goes into a checkpoint, as one flat dict of tensors for DCP, and how it is put back.

Keys: ``model.<name>`` (the module's ``state_dict``: DTensor shards under FSDP2, adapters and quantised bases
included), ``optim.<parameter name>.<state key>`` (every tensor of the optimizer's per-parameter state: Adam
moments, GaLore projectors, counters, seeds and error-feedback buffers, 8-bit codes), ``extra.<part>.<key>``
(train state, method state, data loader position). Hyper-parameters are not saved: they are rebuilt from the
config, and the learning rate is a function of the step.

Under FSDP2 a state tensor that follows its parameter's rows is saved as a DTensor sharded like the parameter,
so DCP can load it on another number of ranks; state that every rank holds whole is saved once; state that is
specific to a rank's shard but not by rows (8-bit quantisation blocks) is saved per rank (``.rank<r>`` keys) and
loads only on the same number of ranks. An optimizer says which is which through the shard-aware protocol
(:class:`megatron_pept.sharding.ShardAwareOptimizer`: ``state_layout(param, key)`` returning ``"rows"``,
``"replicated"`` or ``"local"``); an optimizer that declares nothing keeps DTensor state for DTensor parameters,
or state shaped like the local shard (``rows``), or whole tensors (``replicated``). Counters the step reads on the
host (``step``, ``refreshes``, ``seed``: :data:`megatron_pept.sharding.HOST_STATE_KEYS`) load into host tensors, where
the optimizers keep them: on the device every step would wait to read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from megatron_pept.distributed import comm
from megatron_pept.errors import UserError
from megatron_pept.sharding import ShardAwareOptimizer, keeps_on_host, optimizer_protocol


def _layout(protocol: ShardAwareOptimizer, p: torch.Tensor, key: str, local_shape: torch.Size | None) -> str:
    if protocol.zero_layout is not None:
        return protocol.state_layout(p, key) or "local"
    if not isinstance(p, DTensor):
        return "replicated"
    declared = protocol.state_layout(p, key)
    if declared is not None:
        return declared
    return "rows" if local_shape is not None and local_shape == p.to_local().shape else "replicated"


def _rows_dtensor(p: DTensor, local: torch.Tensor) -> DTensor:
    shape = torch.Size((p.shape[0], *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def model_state(model: nn.Module) -> dict[str, Any]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    protocol = optimizer_protocol(optimizer)
    names = {p: n for n, p in model.named_parameters()}
    out: dict[str, Any] = {}
    for p, state in optimizer.state.items():
        if not state:
            continue  # e.g. the empty entries DeepSpeed creates for its flat partitions
        if p not in names:
            raise RuntimeError("optimizer holds state for a tensor that is not a parameter of the model")
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise RuntimeError(f"optimizer state {names[p]}.{key} is not a tensor ({type(value).__name__})")
            name = f"optim.{names[p]}.{key}"
            if isinstance(value, DTensor):  # an optimizer stepping DTensors directly keeps DTensor state
                out[name] = value
                continue
            kind = _layout(protocol, p, key, value.shape)
            if kind == "rows":
                out[name] = _rows_dtensor(p, value)
            elif kind == "local":
                out[f"{name}.rank{comm.rank()}"] = value
            else:
                out[name] = value
    return out


def checkpoint_state(model: nn.Module, optimizer: Any, parts: dict[str, Any], *, native: bool) -> dict[str, Any]:
    """What DCP writes for a checkpoint: the parts' tensors (:func:`extra_state`), and the model's and the
    optimizer's state unless the backend's own format holds them (``native``; our optimizer's state is still
    written by parameter where it keeps a ZeRO layout of its own)."""
    state = extra_state(parts)
    if not native:
        state.update(model_state(model))
        state.update(optimizer_state(model, optimizer))
    elif optimizer_protocol(optimizer).zero_layout is not None:
        state.update(optimizer_state(model, optimizer))  # our optimizer's own state, per model parameter
    return state


def extra_key(part: str, key: str) -> str:
    return f"extra.{part}.{key}"


def extra_state(parts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``extra.<part>.<key>`` for objects with a tensor ``state_dict()`` (train state, method, loader)."""
    return {extra_key(part, k): v for part, obj in parts.items() for k, v in obj.state_dict().items()}


def load_extra(parts: dict[str, Any], loaded: dict[str, torch.Tensor]) -> None:
    for part, obj in parts.items():
        prefix = f"extra.{part}."
        obj.load_state_dict({k[len(prefix) :]: v for k, v in loaded.items() if k.startswith(prefix)})


def optimizer_destinations(model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """Empty tensors to load the saved optimizer state into (a fresh optimizer has no state to load in place).

    ``saved`` maps each checkpoint key to its ``TensorStorageMetadata`` (global size and dtype)."""
    params = dict(model.named_parameters())
    protocol = optimizer_protocol(optimizer)
    if protocol.zero_layout is not None:
        trainable = {id(q) for pieces in protocol.zero_layout.values() for q, _ in pieces}
    else:
        trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, Any] = {}
    rank = comm.rank()
    for key, meta in saved.items():
        if not key.startswith("optim."):
            continue
        rest = key[len("optim.") :]
        name, state_key = _split_param_key(rest, params)
        if name is None:
            raise UserError(f"the checkpoint has optimizer state for {rest!r}, a parameter this model does not have")
        p = params[name]
        if id(p) not in trainable:
            continue  # state of a parameter this phase does not train (kept in the checkpoint, not loaded)
        if _is_rank_key(state_key):
            base, owner = state_key.rsplit(".", 1)
            world = comm.world_size()
            prefix = f"optim.{name}.{base}.rank"
            ranks = {k[len(prefix) :] for k in saved if k.startswith(prefix)}
            if ranks != {str(r) for r in range(world)}:
                raise UserError(
                    f"optimizer state {name}.{base} is specific to each rank's shard (8-bit blocks) and was saved "
                    f"on {len(ranks)} ranks; this run has {world}: resume on the same number of ranks"
                )
            if owner == f"rank{rank}":
                out[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=_device(p))
            continue
        declared = protocol.state_layout(p, state_key) is not None  # our optimizers keep plain local tensors
        if isinstance(p, DTensor) and not declared and tuple(meta.size) == tuple(p.shape):
            local = torch.empty(p.to_local().shape, dtype=meta.properties.dtype, device=_device(p))
            out[key] = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
            continue
        kind = _layout(protocol, p, state_key, None)
        if kind == "rows" and isinstance(p, DTensor) and len(meta.size) >= 1 and meta.size[0] == p.shape[0]:
            local_rows = p.to_local().shape[0]
            local = torch.empty((local_rows, *meta.size[1:]), dtype=meta.properties.dtype, device=_device(p))
            out[key] = _rows_dtensor(p, local)
        elif kind == "local":
            raise UserError(
                f"optimizer state {name}.{state_key} is specific to each rank but was saved without rank keys; "
                "resume with the configuration it was saved with"
            )
        else:
            host = keeps_on_host(state_key, meta.size, _group_of(protocol.owner(p), p))
            out[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu" if host else _device(p))
    return out


def _group_of(optimizer: Any, p: torch.Tensor) -> dict | None:
    return next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)


def install_optimizer_state(model: nn.Module, optimizer: Any, loaded: dict[str, Any]) -> None:
    protocol = optimizer_protocol(optimizer)
    params = dict(model.named_parameters())
    touched: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        name, state_key = _split_param_key(key[len("optim.") :], params)
        if _is_rank_key(state_key):
            state_key = state_key.rsplit(".", 1)[0]
        p = touched[name] = params[name]
        if isinstance(value, DTensor) and protocol.state_layout(p, state_key) is not None:
            value = value.to_local()  # our sharded optimizers keep their rows as plain tensors
        protocol.owner(p).state[p][state_key] = value
    for p in touched.values():
        protocol.restore_loaded_state(p)  # e.g. memory layouts the optimizer's arithmetic depends on, bit for bit


def _is_rank_key(state_key: str) -> bool:
    last = state_key.rsplit(".", 1)
    return len(last) == 2 and last[1].startswith("rank") and last[1][4:].isdigit()


def _split_param_key(rest: str, params: dict[str, Any]) -> tuple[str | None, str]:
    """``<param name>.<state key>`` where both may contain dots: the longest parameter name that prefixes it."""
    best = None
    for name in params:
        if rest.startswith(name + ".") and (best is None or len(name) > len(best)):
            best = name
    return best, rest[len(best) + 1 :] if best else rest


def _device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if isinstance(p, DTensor) else p.device


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def read_rng_state(path: Path) -> dict[str, torch.Tensor]:
    """A rank's saved RNG states (tensors only: ``weights_only=True``); one UserError if the file is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated (EOFError), garbled (UnpicklingError), refused globals, unreadable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"{path} cannot be read ({type(err).__name__}{': ' + reason[:200] if reason else ''}); the checkpoint is "
            "damaged: resume from an earlier one (checkpoint.resume=PATH) or remove it"
        ) from None
    generator = state.get("cpu") if isinstance(state, dict) else None
    if not (torch.is_tensor(generator) and generator.dtype == torch.uint8 and generator.ndim == 1):
        raise UserError(f"{path} holds no CPU generator state; the checkpoint is damaged: resume from an earlier one")
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
