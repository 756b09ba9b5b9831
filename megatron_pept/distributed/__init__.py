"""The one place that sets up processes, devices and the data-parallel layout.

Everything else receives a :class:`ParallelDims` (ranks, sizes, the device mesh) instead of asking
torch.distributed. Launchers (torchrun, SLURM) set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; the same entry point runs unchanged on one process or many.

Backends:

* ``single``: one process.
* ``ddp``: ``DistributedDataParallel`` (gradients all-reduced in buckets during backward). With per-layer
  updates the model is not wrapped; each gradient is all-reduced in its own hook right before its step.
* ``fsdp2``: ``fully_shard`` on every transformer block, then on the root; parameters are DTensors sharded by
  rows (dim 0). The model is initialised in full on every rank and then sharded, so a run's weights do not depend
  on the number of ranks (a 7B model needs its full fp32 weights in CPU memory once per rank while starting). On
  GPU a mixed-precision policy computes in bf16 and reduces gradients in fp32.
* ``deepspeed``: DeepSpeed ZeRO stage 1, 2 or 3 (``parallel.zero_stage``) with our optimizer as its client
  optimizer; see :mod:`megatron_pept.distributed.deepspeed_backend`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_pept.config import ParallelConfig, TrainConfig
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
        return self.backend != "single"


def resolve_device(cfg: TrainConfig, *, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _without_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU accelerator from building its shared-memory all-reduce.

    On CPU, ``deepspeed.init_distributed`` JIT-compiles a C++ op (``deepspeed_shm_comm``, about a minute of g++,
    under a lock file in ``~/.cache/torch_extensions`` that a process killed mid-build leaves behind, after which
    every later start waits on it for ever) and maps two 66 MiB buffers into ``/dev/shm`` that are never unlinked
    when a process ends without running destructors. Only DeepSpeed's inference all-reduce uses it; training
    collectives go through gloo. Marking the op unavailable makes DeepSpeed skip the build and the buffers.
    """
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # DeepSpeed reads this dict before building the op
    compatible["deepspeed_shm_comm"] = False


def init_parallel(cfg: ParallelConfig, *, train: TrainConfig | None = None) -> ParallelDims:
    """Read the launcher's environment and set up the process group and mesh the backend needs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.backend == "single":
        if world_size > 1:
            raise ConfigError(
                f"parallel.backend=single but the launcher started {world_size} processes; "
                "set parallel.backend to ddp or fsdp2"
            )
        return ParallelDims(backend="single")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(train or TrainConfig(), local_rank=local_rank)
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # one process without a launcher: no fixed port to clash on
    if cfg.backend == "deepspeed":
        import deepspeed

        # A complete torch-style environment keeps DeepSpeed from falling back to MPI discovery (mpi4py) when
        # the entry point is started as one plain process.
        for key, value in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("RANK", str(rank)),
            ("WORLD_SIZE", str(world_size)),
            ("LOCAL_RANK", str(local_rank)),
        ):
            os.environ.setdefault(key, value)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            _without_shared_memory_allreduce()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=int(os.environ.get("MEGATRON_PEPT_PG_TIMEOUT_MIN", "30"))),
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    return ParallelDims(backend=cfg.backend, rank=rank, world_size=world_size, local_rank=local_rank, mesh=mesh)


def parallelize(model: nn.Module, dims: ParallelDims, *, device: torch.device, per_layer: bool = False) -> nn.Module:
    """Wrap or shard a materialised, initialised ``model`` for the backend; returns the module to train."""
    if dims.backend in ("single", "deepspeed") or (dims.backend == "ddp" and per_layer):
        return model  # DeepSpeed wraps the model with its optimizer (megatron_pept.distributed.deepspeed_backend)
    if dims.backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if dims.backend == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if device.type == "cuda"
            else None
        )
        kwargs: dict[str, Any] = {"mesh": dims.mesh}
        if mp is not None:
            kwargs["mp_policy"] = mp
        for layer in model.model.layers.values():
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ConfigError(f"unknown parallel.backend {dims.backend!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dims.world_size
    return t


def grad_all_reduce_mean(dims: ParallelDims):  # noqa: ANN201 - returns a hook function or None
    """For per-layer updates under DDP: average one gradient over the ranks, in place."""
    if dims.backend != "ddp" or dims.world_size == 1:
        return None

    def reduce(grad: torch.Tensor) -> None:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(dims.world_size)

    return reduce


def barrier(dims: ParallelDims) -> None:
    if dims.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(dims: ParallelDims) -> None:
    if dims.distributed and dist.is_initialized():
        dist.destroy_process_group()
