"""The one place that sets up processes, devices and the data-parallel layout, and the parallel backends.

Everything else receives a :class:`ParallelDims` (ranks, sizes, the device mesh) and a :class:`Backend` instead of
asking torch.distributed; process-level collectives are in :mod:`.comm`. Launchers (torchrun, SLURM) set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the same entry point runs unchanged
on one process or many.

Backends (one class each, :mod:`.backend` and :mod:`.deepspeed_backend`, registered in :data:`BACKENDS`):

* ``single``: one process.
* ``ddp``: ``DistributedDataParallel`` (gradients all-reduced in buckets during backward). With per-layer
  updates the model is not wrapped; each gradient is all-reduced in its own hook right before its step.
* ``fsdp2``: ``fully_shard`` on every transformer block, then on the root; parameters are DTensors sharded by
  rows (dim 0). The model is sharded on the meta device, then each rank materialises and initialises only its own
  rows (each weight from its own seed, :mod:`megatron_pept.models.init`), so a run's weights do not depend on the
  number of ranks and no rank holds the whole model while starting (a method whose ``after_init`` changes the
  layers' tensors, a quantised frozen base, starts one block at a time, each sharded before the next is made:
  ``Method.init_sharded``). On GPU a run computing in bf16 gets a mixed-precision policy (bf16 parameters in
  forward and backward, gradients reduced in fp32); an fp32 run computes in fp32.
* ``deepspeed``: DeepSpeed ZeRO stage 1, 2 or 3 (``parallel.zero_stage``) with our optimizer as its client
  optimizer.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_pept.config import Config, ParallelConfig, TrainConfig
from megatron_pept.distributed.backend import (
    Backend,
    DDPBackend,
    FSDP2Backend,
    compute_dtype,
    fsdp2_mixed_precision,
)
from megatron_pept.distributed.deepspeed_backend import DeepSpeedBackend
from megatron_pept.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    backend: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: Any = None  # a 1-D DeviceMesh over the data-parallel ranks (ddp, fsdp2)

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_world_size(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up (launched with RANK/WORLD_SIZE, even for one process)."""
        return self.mesh is not None


def resolve_device(cfg: TrainConfig, *, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_parallel(cfg: ParallelConfig, *, train: TrainConfig | None = None) -> ParallelDims:
    """Read the launcher's environment and set up the process group (as the backend starts it) and the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cls = backend_class(cfg.backend)
    if not cls.uses_process_group:
        if world_size > 1:
            raise ConfigError(
                f"parallel.backend={cfg.backend} but the launcher started {world_size} processes; "
                "set parallel.backend to ddp or fsdp2"
            )
        return ParallelDims(backend=cfg.backend)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(train or TrainConfig(), local_rank=local_rank)
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # one process without a launcher: no fixed port to clash on
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cls.init_process_group(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    return ParallelDims(backend=cfg.backend, rank=rank, world_size=world_size, local_rank=local_rank, mesh=mesh)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (Backend, DDPBackend, FSDP2Backend, DeepSpeedBackend)}
"""``parallel.backend`` -> its class; :func:`register_backend` adds one."""


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make ``cls`` selectable as ``parallel.backend=<cls.name>`` (usable as a class decorator)."""
    BACKENDS[cls.name] = cls
    return cls


def backend_class(name: str) -> type[Backend]:
    """The registered backend ``parallel.backend=name`` selects; a ConfigError naming the choices otherwise."""
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, list(BACKENDS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key 'parallel.backend' must be one of {', '.join(BACKENDS)}; got {name!r}{hint}")
    return BACKENDS[name]


def build_backend(cfg: Config) -> Backend:
    """Start this process's part of the run (process group, mesh, device) and return its backend."""
    dims = init_parallel(cfg.parallel, train=cfg.train)
    device = resolve_device(cfg.train, local_rank=dims.local_rank)
    return backend_class(cfg.parallel.backend)(cfg, dims, device)


__all__ = [
    "BACKENDS",
    "Backend",
    "ParallelDims",
    "backend_class",
    "build_backend",
    "compute_dtype",
    "fsdp2_mixed_precision",
    "init_parallel",
    "register_backend",
    "resolve_device",
]
