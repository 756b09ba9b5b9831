"""The parallel backends behind one interface: everything that differs between one process, DDP, FSDP2 and
DeepSpeed ZeRO lives in a :class:`Backend` subclass, so the trainer runs one step body for all of them and never
tests a backend's name or type.

A backend owns:

* starting the process group (:meth:`Backend.init_process_group`) and refusing configs it cannot run
  (:meth:`Backend.validate`, called by config validation);
* wrapping the model (:meth:`Backend.wrap`; :attr:`Backend.model` is what forward calls);
* what happens when an optimizer is set or replaced (:meth:`Backend.use_optimizer`);
* backward with gradient sync on the last micro-batch only, and the optimizer step with clipping
  (:meth:`Backend.backward`, :meth:`Backend.step`);
* whole-tensor access to parameters and optimizer state (:attr:`Backend.access`, a
  :class:`~megatron_pept.sharding.ParamAccess`);
* its own checkpoint format, if any (:meth:`Backend.save_native`, :meth:`Backend.load_native`).

How to add one: ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from megatron_pept.config import Config, TrainConfig
from megatron_pept.distributed import comm
from megatron_pept.errors import ConfigError
from megatron_pept.sharding import LOCAL_ACCESS, ParamAccess, full, optimizer_protocol
from megatron_pept.traits import MethodTraits

if TYPE_CHECKING:
    from megatron_pept.distributed import ParallelDims


def compute_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype a run computes in (``train.dtype``): bf16 (autocast over fp32 master weights) when asked, or for
    ``auto`` on CUDA or over bf16 weights (``train.param_dtype=bf16``); fp32 otherwise."""
    auto_bf16 = torch.device(device).type == "cuda" or train.param_dtype == "bf16"
    bf16 = train.dtype == "bf16" or (train.dtype == "auto" and auto_bf16)
    return torch.bfloat16 if bf16 else torch.float32


def fsdp2_mixed_precision(dtype: torch.dtype, *, device_type: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a run computing in ``dtype`` on ``device_type``: on CUDA in bf16, the
    parameters are all-gathered and used in bf16 and gradients reduced in fp32; None (parameters used as stored,
    fp32) for an fp32 run, and on a CPU, where bf16 compute is the trainer's autocast as on every other backend.

    The blocks' floating inputs are not cast (``cast_forward_inputs=False``): they are the hidden states, bf16
    already (from the bf16 embedding), and the rotary tables, which must stay fp32."""
    if device_type != "cuda" or dtype == torch.float32:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


class Backend:
    """One process (the ``single`` backend) and the defaults every backend starts from."""

    name: ClassVar[str] = "single"
    uses_process_group: ClassVar[bool] = False
    """Started by a launcher with RANK/WORLD_SIZE; a process group and a device mesh are set up."""
    can_replace_optimizer: ClassVar[bool] = True
    """The run may swap its optimizer (a warm-start phase switch, a checkpoint of another phase)."""
    shards_on_meta: ClassVar[bool] = False
    """:meth:`wrap` may take the model still on the meta device and shard it there: the trainer then materialises
    and initialises only this rank's shards (no rank ever holds the whole model)."""
    state_tensors_per_param: ClassVar[int] = 2
    """fp32 tensors per trainable parameter in a checkpoint beyond the weights (Adam's moments; ZeRO adds a master
    copy): for the disk-space estimate before the first step."""

    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device) -> None:
        self.cfg, self.dims, self.device = cfg, dims, device
        self.per_layer = cfg.optim.per_layer
        self.grad_accum_steps = 1
        self.raw_model: nn.Module | None = None  # what methods, optimizers and checkpoints see
        self.model: Any = None  # what forward calls (a wrapper, an engine, or the model itself)
        self.access: ParamAccess = LOCAL_ACCESS
        self.compute_dtype = compute_dtype(cfg.train, device)
        """What the run computes in (:func:`compute_dtype`)."""
        self.target_device_type = device.type
        """The device type whose policies the run follows (FSDP2's mixed precision): the device's own, except in
        the memory planner, which runs a CUDA run's code on fake CPU tensors (:mod:`megatron_pept.plan`)."""

    # -- set-up ---------------------------------------------------------------------------------------------------

    @classmethod
    def validate(cls, cfg: Config, traits: MethodTraits) -> None:
        """Refuse, with a :class:`~megatron_pept.errors.ConfigError`, settings this backend cannot run; what the
        method does comes from its declared ``traits``, never from its settings."""

    @classmethod
    def init_process_group(cls, *, rank: int, world_size: int, local_rank: int, device: torch.device) -> None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        comm.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout_minutes=int(os.environ.get("MEGATRON_PEPT_PG_TIMEOUT_MIN", "30")),
        )

    def wrap(
        self,
        model: nn.Module,
        *,
        grad_accum_steps: int,
        prepare_block: Callable[[nn.Module], None] | None = None,
    ) -> Any:
        """Take the materialised, initialised model (or, where :attr:`shards_on_meta`, the model on the meta
        device, to be materialised after); returns what forward calls (also :attr:`model`). ``prepare_block``
        (:attr:`shards_on_meta` backends): called with each transformer block, still on the meta device, right
        before the backend shards it (to materialise and initialise it whole, one block at a time)."""
        self.raw_model, self.grad_accum_steps = model, grad_accum_steps
        if prepare_block is None:
            self.model = self._wrap(model)
        elif self.shards_on_meta:
            self.model = self._wrap(model, prepare_block=prepare_block)
        else:
            raise ValueError(f"the {self.name} backend takes a materialised model: it has no blocks to prepare")
        return self.model

    def _wrap(self, model: nn.Module) -> Any:
        return model

    def use_optimizer(self, optimizer: Any, *, replacing: bool) -> None:
        """Called with every optimizer the run trains with: the first (``replacing=False``) and each one that
        replaces it (``replacing=True``, only if :attr:`can_replace_optimizer`)."""

    def grad_reduce_hook(self) -> Callable[[torch.Tensor], None] | None:
        """For per-layer updates on a backend that does not reduce gradients itself: averages one gradient over
        the data-parallel ranks, in place, inside its backward hook."""
        return None

    # -- one optimizer step ---------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        """Backward of one micro-batch's mean loss, the data-parallel gradient sync only on the ``last`` one;
        returns the micro-batch's share of the step's loss (detached)."""
        scaled = loss / self.grad_accum_steps
        with self._gradient_sync(last):
            scaled.backward()
        return scaled.detach()

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(
        self, optimizer: Any, params: list[nn.Parameter], *, max_norm: float, accept: Callable[[float], bool]
    ) -> tuple[float, bool]:
        """End the optimizer step once every micro-batch's backward ran: the gradient norm (before clipping) and
        whether the update was applied. ``accept(grad_norm)`` decides (the guard: non-finite steps, spikes); an
        optimizer that steps in backward (per-layer) has already applied it."""
        protocol = optimizer_protocol(optimizer)
        if protocol.steps_in_backward:
            grad_norm = full(protocol.disarm()).item()
            ok = accept(grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            grad_norm = full(norm).item()
            ok = accept(grad_norm)
            if ok:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_native(self, folder: Path) -> bool:
        """Write what this backend keeps in its own checkpoint format into ``folder``; True if that holds the
        model's weights (which the DCP state then leaves out)."""
        return False

    def load_native(self, folder: Path) -> bool:
        """Load what :meth:`save_native` wrote; True if it restored the model's weights."""
        return False

    def checkpoint_bytes(self, model: nn.Module, trainable: list[nn.Parameter]) -> int:
        """About how large one checkpoint is: the model's tensors plus the optimizer's fp32 state tensors."""
        tensors = [*model.parameters(), *model.buffers()]
        weights = sum(self.access.numel(t) * t.element_size() for t in tensors)
        state = sum(self.access.numel(p) for p in trainable) * 4 * self.state_tensors_per_param
        return weights + state + (1 << 20)


class DDPBackend(Backend):
    """``DistributedDataParallel``: gradients all-reduced in buckets during the last micro-batch's backward. With
    per-layer updates the model is not wrapped: each gradient is averaged in its own hook before its step."""

    name = "ddp"
    uses_process_group = True

    def _wrap(self, model: nn.Module) -> Any:
        if self.per_layer:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
        )

    def use_optimizer(self, optimizer: Any, *, replacing: bool) -> None:
        if replacing and not self.per_layer:
            # DDP fixes the set of parameters it reduces when it wraps the model: wrap again.
            self.model = self._wrap(self.raw_model)

    def grad_reduce_hook(self) -> Callable[[torch.Tensor], None] | None:
        world = self.dims.world_size
        if world == 1:
            return None

        def reduce(grad: torch.Tensor) -> None:
            comm.all_reduce_sum(grad)
            grad.div_(world)

        return reduce

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or self.per_layer:
            return contextlib.nullcontext()
        return self.model.no_sync()


class FSDP2Backend(Backend):
    """``fully_shard`` on every transformer block, then on the root: parameters become DTensors sharded by rows."""

    name = "fsdp2"
    uses_process_group = True
    shards_on_meta = True

    @classmethod
    def validate(cls, cfg: Config, traits: MethodTraits) -> None:
        if traits.quantised_base and traits.changes_trainable_set:
            raise ConfigError(
                f"{traits.quantised_base} with {traits.changes_trainable_set} cannot run with parallel.backend=fsdp2: "
                "the switch replaces the trained dense weights by the quantised base, and FSDP2 fixes a module's "
                f"parameters when it shards it; drop {traits.changes_trainable_set} or use parallel.backend=ddp"
            )
        if traits.base_dtype_changes:
            raise ConfigError(
                f"{traits.base_dtype_changes} cannot run with parallel.backend=fsdp2 in this version: the warm start "
                "trains an fp32 master that becomes the base's dtype at the switch, and FSDP2 cannot change a sharded "
                "parameter's dtype; use parallel.backend=ddp or keep the base in fp32"
            )

    def _wrap(self, model: nn.Module, prepare_block: Callable[[nn.Module], None] | None = None) -> Any:
        from torch.distributed.fsdp import fully_shard

        kwargs: dict[str, Any] = {"mesh": self.dims.mesh}
        policy = fsdp2_mixed_precision(self.compute_dtype, device_type=self.target_device_type)
        if policy is not None:
            kwargs["mp_policy"] = policy

        def shard_bases(root: nn.Module) -> None:
            for module in root.modules():  # quantised bases (buffers, which FSDP2 leaves whole): by rows
                if getattr(module, "quantised", False):
                    module.shard_base(self.dims.mesh)  # (a base sharded with its block is left as it is)

        for layer in model.model.layers.values():
            if prepare_block is not None:
                prepare_block(layer)
                shard_bases(layer)  # this block's, before the next block is made
            fully_shard(layer, **kwargs)
        shard_bases(model)
        fully_shard(model, **kwargs)
        return model

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
