"""The one place that sets up processes, devices and data-parallel layout.

Everything else receives a :class:`ParallelDims` (ranks and sizes) instead of asking torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from megatron_pept.config import ParallelConfig, TrainConfig
from megatron_pept.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    backend: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_world_size(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: TrainConfig, *, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_parallel(cfg: ParallelConfig) -> ParallelDims:
    """Read the launcher's environment and set up the process group the backend needs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.backend == "single":
        if world_size > 1:
            raise ConfigError(
                f"parallel.backend=single but the launcher started {world_size} processes; "
                "set parallel.backend to ddp, fsdp2 or deepspeed"
            )
        return ParallelDims(backend="single")
    raise ConfigError(f"parallel.backend={cfg.backend} is not available in this version; use parallel.backend=single")


def parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Wrap or shard ``model`` for the backend (a no-op for a single process)."""
    return model
