"""DeepSpeed ZeRO (stages 1, 2, 3) as a backend: the config generated from ours, the engine, and access to the
partitioned fp32 master weights and optimizer state for methods that rewrite weights (ReLoRA's restarts).

The DeepSpeed config is generated from ours (micro-batch, accumulation, clipping, ZeRO stage, bf16 on GPU); a
JSON or YAML file named by ``parallel.deepspeed_config`` is merged over it for advanced keys (offload, buckets,
communication overlap ...). Keys that must agree with our config (batch sizes, accumulation, clipping) are
refused there, with the key to set instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_pept.config import Config, read_yaml_file, spike_rule_on
from megatron_pept.distributed.backend import Backend
from megatron_pept.errors import ConfigError
from megatron_pept.sharding import FlatFragment, ParamAccess, ZeroLayout, optimizer_protocol
from megatron_pept.traits import MethodTraits

OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x ranks)",
    "gradient_clipping": "train.max_grad_norm",
    "optimizer": "method.name / optim.*",
    "scheduler": "optim.schedule",
}


def deepspeed_config(cfg: Config, *, grad_accum_steps: int, world_size: int, cuda: bool) -> dict[str, Any]:
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.param_dtype == "bf16":
        # DeepSpeed's bf16 weights without an fp32 master: ZeRO hands the optimizer bf16 flat partitions, which ours
        # step through optim.weight_update. bf16_optimizer_states only lifts DeepSpeed's demand for its CPU Adam
        # (it sets the dtype of DeepSpeed's own optimizers' moments); ours keep theirs in optim.state_dtype.
        ds["bf16"] = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    elif cuda and t.dtype in ("auto", "bf16"):
        ds["bf16"] = {"enabled": True}
    if cfg.parallel.deepspeed_config:
        ds = _merge(ds, read_deepspeed_extra(cfg.parallel.deepspeed_config))
    return ds


def read_deepspeed_extra(name: str) -> dict[str, Any]:
    """The mapping of ``parallel.deepspeed_config`` (JSON, or YAML read safely: no tags, no alias bombs), checked
    when the config is validated; each problem one ConfigError line."""
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"parallel.deepspeed_config {path} does not exist (or is not a file)")
    what = "parallel.deepspeed_config"
    if path.suffix == ".json":
        try:
            extra = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{what} {path} cannot be read ({err}); pass a readable JSON or YAML file") from None
        except ValueError as err:
            raise ConfigError(f"{what} {path} is not valid JSON ({err}); fix the syntax there") from None
    else:
        extra = read_yaml_file(path, what=what)
    if not isinstance(extra, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of DeepSpeed keys; got {type(extra).__name__}")
    for key in extra:
        if key in OWNED_KEYS:
            raise ConfigError(f"{what} sets {key!r}; set {OWNED_KEYS[key]} instead")
    return extra


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """The DeepSpeed engine around ``model`` with our optimizer as its client optimizer."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


class DeepSpeedAccess(ParamAccess):
    """Whole parameters and optimizer state through DeepSpeed's safe accessors (ZeRO 1, 2 and 3).

    A write goes both to the fp32 master partition (what the next step starts from) and to the module's own
    parameter (what the next forward uses; gathered and re-partitioned under ZeRO-3).
    """

    def __init__(self, engine_optimizer: Any = None) -> None:
        self.engine_optimizer = engine_optimizer  # the ZeRO optimizer wrapping ours

    def get(self, t: torch.Tensor) -> torch.Tensor:
        if not _is_ds_param(t):
            return super().get(t)
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(t) if t.requires_grad else None
        if value is not None:
            return value
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], enabled=hasattr(t, "ds_tensor")):  # a frozen ZeRO-3 weight
            return t.data.detach().float().clone()

    def set(self, t: torch.Tensor, value: torch.Tensor) -> None:
        if not _is_ds_param(t):
            return super().set(t, value)
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        if t.requires_grad:
            if hasattr(t, "ds_tensor"):
                _zero3_set_partition(t, value.float(), None)
            else:
                safe_set_full_fp32_param(t, value.float())
        # Every rank computed the same value; rank 0's copy is the one re-partitioned under ZeRO-3.
        with deepspeed.zero.GatheredParameters([t], modifier_rank=0, enabled=hasattr(t, "ds_tensor")):
            t.data.copy_(value.to(t.dtype))

    def get_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        try:
            return safe_get_full_optimizer_state(p, key)
        except ValueError:
            # ZeRO-1/2 link parameters to their optimizer-state fragments once, after the first step of the first
            # parameter group, before torch's optimizer has created the state of the other groups: link again.
            self._relink()
            return safe_get_full_optimizer_state(p, key)

    def _relink(self) -> None:
        zero = self.engine_optimizer
        if zero is not None and hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def set_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if hasattr(p, "ds_tensor"):
            _zero3_set_partition(p, value, key)
        else:
            safe_set_full_optimizer_state(p, value, key)

    def state_keys(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] if p.requires_grad else []

    def numel(self, t: torch.Tensor) -> int:
        return getattr(t, "ds_numel", t.numel())  # a ZeRO-3 parameter's local tensor is empty


def _zero3_set_partition(param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Write this rank's ZeRO-3 partition of ``value`` (the fp32 master when ``key`` is None, else that optimizer
    state). DeepSpeed's ``set_full_hp_param`` reads past the end of the value for the last rank when the number
    of elements does not divide by the ranks (e.g. a DoRA magnitude of 101 rows); the partition's padding is left
    as it is here."""
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = zero._get_param_partition_rank(param)
    flat = value.detach().flatten().to(part.dtype)
    start = min(part.numel() * rank, flat.numel())
    stop = min(start + part.numel(), flat.numel())
    part.data[: stop - start].copy_(flat[start:stop])


def _is_ds_param(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) and (hasattr(t, "ds_id") or hasattr(t, "_hp_mapping"))


def zero_layout(engine_optimizer: Any) -> ZeroLayout:
    """For each flat fp32 partition ZeRO hands the client optimizer (keyed by ``id``), the model parameters it holds
    pieces of, in ZeRO's order (the same on every rank), each with this rank's :class:`FlatFragment` of it.

    Stages 1 and 2: a group's parameters are concatenated and the concatenation cut into equal partitions, so a
    parameter may be split across ranks anywhere (DeepSpeed's own ``_hp_mapping`` gives where). Stage 3: each
    parameter is cut into equal partitions of its own, and a sub-group's flat tensor concatenates them."""
    zero = engine_optimizer
    layout: ZeroLayout = {}
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            group = zero.real_dp_process_group[i]
            pieces = []
            for p in zero.bit16_groups[i]:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:  # no piece of p on this rank; it still joins the collectives
                    frag = FlatFragment(p.shape, lo=0, numel=0, offset=0, group=group)
                else:
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    frag = FlatFragment(p.shape, lo=lp.start, numel=lp.numel, offset=hp.start, group=group)
                pieces.append((p, frag))
            layout[id(flat)] = pieces
    elif hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        import torch.distributed as dist

        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            pieces = []
            for p in zero.fp16_groups[i]:
                group = zero._get_param_partition_group(p)
                _, offset, size = zero.grad_position[zero.get_param_id(p)]
                lo = dist.get_rank(group=group) * size
                numel = max(0, min(size, p.ds_numel - lo))
                pieces.append((p, FlatFragment(p.ds_shape, lo=lo, numel=numel, offset=offset, group=group)))
            layout[id(flat)] = pieces
    else:  # pragma: no cover - a DeepSpeed version with another optimizer layout
        raise RuntimeError(f"unknown ZeRO optimizer layout: {type(zero).__name__}")
    return layout


def load_checkpoint(engine: Any, folder: Path) -> None:
    """Load a checkpoint DeepSpeed saved, without executing pickled code: DeepSpeed's own loader unpickles with
    ``weights_only=False``; here its files are read with ``weights_only=True`` and only the few DeepSpeed
    classes its optimizer files hold (loss scaler, ZeRO stage enum, fragment addresses) are allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    checkpoint_engine = engine.checkpoint_engine

    def safe_load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:
                raise ConfigError(
                    f"{path} holds objects a safe load does not allow ({str(err).splitlines()[-1][:200]})"
                ) from None

    original = checkpoint_engine.load
    checkpoint_engine.load = safe_load
    try:
        path, _ = engine.load_checkpoint(str(folder), tag="state", load_module_strict=True)
    finally:
        checkpoint_engine.load = original
    if path is None:
        raise ConfigError(f"DeepSpeed found no checkpoint in {folder}")


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


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 1, 2 or 3 with our optimizer as the engine's client optimizer. The engine scales the loss
    for accumulation, reduces and clips the gradients, and steps at the accumulation boundary; methods reach the
    partitioned fp32 master weights and optimizer state through :class:`DeepSpeedAccess`, and matrix-aware
    optimizers step ZeRO's flat partitions as fragments of the model's parameters (:func:`zero_layout`)."""

    name = "deepspeed"
    uses_process_group = True
    can_replace_optimizer = False  # the engine is built for one optimizer and a fixed set of parameters
    state_tensors_per_param = 3  # fp32 master weights beside the two moments (an upper bound with bf16 weights)

    @classmethod
    def validate(cls, cfg: Config, traits: MethodTraits) -> None:
        p = cfg.parallel
        if p.deepspeed_config:
            read_deepspeed_extra(p.deepspeed_config)  # with the config, not after the model is built
        if p.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3 with deepspeed; got {p.zero_stage}")
        if cfg.optim.per_layer:
            raise ConfigError(
                "optim.per_layer=true cannot run with parallel.backend=deepspeed: DeepSpeed owns the optimizer step; "
                "use parallel.backend=fsdp2 or ddp"
            )
        if traits.quantised_base and p.zero_stage == 3:
            raise ConfigError(
                f"{traits.quantised_base} cannot run with ZeRO-3: ZeRO-3 partitions parameters, and "
                "a quantised base is frozen state that ZeRO-3 would keep whole on every rank, so it would save "
                "nothing there; use parallel.zero_stage=1 or 2 (the base is replicated, as the weights are) or "
                "parallel.backend=fsdp2 (the quantised base is sharded by rows)"
            )
        if spike_rule_on(cfg.guard):
            raise ConfigError(
                "guard.spike_loss_sigma and guard.spike_grad_norm_ratio cannot run with parallel.backend=deepspeed "
                "(the engine applies the update before the step can be judged); set both to 0 or use fsdp2 or ddp"
            )
        if traits.changes_trainable_set:
            raise ConfigError(
                f"{traits.changes_trainable_set} cannot run with parallel.backend=deepspeed in this version: the "
                "switch changes which parameters train, and a DeepSpeed engine is built for a fixed set; use "
                "parallel.backend=fsdp2 or ddp"
            )

    @classmethod
    def init_process_group(cls, *, rank: int, world_size: int, local_rank: int, device: torch.device) -> None:
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
        if device.type != "cuda":
            _without_shared_memory_allreduce()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)

    def __init__(self, cfg: Config, dims: Any, device: torch.device) -> None:
        super().__init__(cfg, dims, device)
        self.engine: Any = None

    def use_optimizer(self, optimizer: Any, *, replacing: bool) -> None:
        if replacing:
            raise ConfigError("the DeepSpeed engine's optimizer cannot be replaced during a run")
        ds_config = deepspeed_config(
            self.cfg,
            grad_accum_steps=self.grad_accum_steps,
            world_size=self.dims.world_size,
            cuda=self.device.type == "cuda",
        )
        self.engine = initialize(self.raw_model, optimizer, ds_config)
        self.model = self.engine
        # Matrix-aware optimizers work on ZeRO's fragments; element-wise ones step the flat partitions as they are.
        optimizer_protocol(optimizer).attach_zero(zero_layout(self.engine.optimizer))
        self.access = DeepSpeedAccess(self.engine.optimizer)

    def backward(self, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        self.engine.backward(loss)  # scaled for accumulation by the engine
        self.engine.step()  # applies the update at the accumulation boundary only
        return loss.detach() / self.grad_accum_steps

    def step(
        self, optimizer: Any, params: list[torch.nn.Parameter], *, max_norm: float, accept: Callable[[float], bool]
    ) -> tuple[float, bool]:
        # DeepSpeed has stepped already (bf16/fp32 have no overflow skip): a bad step is counted and rolled back.
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        return grad_norm, accept(grad_norm)

    def save_native(self, folder: Path) -> bool:
        """DeepSpeed's own checkpoint in ``folder/deepspeed`` under the tag ``state``, with the ``latest`` file that
        names it (content ``state``, as DeepSpeed writes it), so that its ``zero_to_fp32.py`` beside it consolidates
        the weights without ``--tag``. Written by rank 0 after every rank saved, whatever checkpoint engine is
        configured (DeepSpeed defers ``latest`` to a later commit with the decoupled one)."""
        ds_folder = folder / "deepspeed"
        self.engine.save_checkpoint(str(ds_folder), tag="state", save_latest=False)
        if self.engine.global_rank == 0:
            (ds_folder / "latest").write_text("state")
        return True

    def load_native(self, folder: Path) -> bool:
        load_checkpoint(self.engine, folder / "deepspeed")
        return True
