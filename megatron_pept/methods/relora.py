"""The ReLoRA family: LoRA, ReLoRA, ReDoRA, RePiSSA, ReLoQRa.

All share one driver, :class:`LowRankMethod`:

* ``convert`` swaps the targeted ``nn.Linear`` layers (default: every attention and MLP projection) for
  :class:`LowRankLinear` of the method's kind; embeddings, norms and the LM head train full-rank.
* **Warm start** (``method.warm_start_steps = N > 0``) is a phase of the same run: for N steps the layers act as
  plain linear layers whose weights train; after step N the weights freeze, the adapters are initialised from
  them (by kind), and the optimizer is rebuilt keeping the moments of the parameters that still train
  (embeddings, norms, LM head) and dropping those of the now-frozen weights.
* **Restarts** (every method but ``lora``): every ``reset_every`` steps after the low-rank phase began, each
  layer merges its adapter into its weight and re-initialises from the merged weight (ReLoRA Algorithm 1 and its
  variants), and the adapters' Adam moments are pruned (``optimizer_reset``, ``prune_ratio``).
* The **jagged schedule**: at the warm-start switch and at each restart the learning rate drops to zero and
  warms up linearly over ``restart_warmup_steps`` back onto the configured schedule.

Scalars under ``relora/``: ``restarts``, ``phase`` (0 warm start, 1 low-rank), ``adapter_norm`` (global norm of
the adapter parameters), and at each restart ``pruned_fraction`` (share of adapter moment entries that are zero
afterwards) and ``merged_update_norm`` (global Frobenius norm of the update the restart merged, i.e. how far the
effective weights moved during the cycle).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from megatron_pept.config import OptimConfig
from megatron_pept.errors import ConfigError
from megatron_pept.methods.base import Method, MethodSettings, PlannedEvents, StepEnd, require
from megatron_pept.methods.lowrank import LowRankLinear
from megatron_pept.optim import JaggedSchedule, Schedule
from megatron_pept.optim.pruning import reset_optimizer_state
from megatron_pept.quant import FORMATS as QUANT_FORMATS
from megatron_pept.sharding import LOCAL_ACCESS, ParamAccess
from megatron_pept.traits import MethodTraits

_BASE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
LOWRANK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LowRankSettings(MethodSettings):
    """The settings of the ReLoRA family (lora, relora, redora, repissa, reloqra)."""

    family = "ReLoRA family"

    base_dtype: Literal["auto", "fp32", "bf16", "int8", "nf4", "fp8"] = "auto"
    """Storage of the frozen base weights of low-rank methods; auto keeps them like the other master weights
    (fp32). bf16 halves their memory but rounds every merge (a warm start trains an fp32 master until the switch).
    int8 (per-row absmax), nf4 (QLoRA's 4-bit NormalFloat, blockwise) and fp8 (e4m3 with per-row scales; a storage
    format, so any device: no fp8 compute is involved): the forward uses the base dequantised to the compute dtype;
    merges go into the master (method.base_master). Backends: single, ddp, fsdp2 (parts sharded by rows/blocks),
    deepspeed ZeRO-1/2."""
    base_master: Literal["host", "device", "none"] = "host"
    """With a quantised base: where the exact fp32 master that merges go into lives. host: CPU memory (on a GPU run
    the device holds only the quantised base; under fsdp2 the master is sharded beside the other shards instead);
    device: beside the quantised base; none: no master, each merge requantises the dequantised base plus the update
    (least memory, but requantisation drifts: docs/benchmarks.md)."""
    nf4_double_quant: bool = True
    """With base_dtype=nf4: quantise the per-block scales again to int8 (QLoRA's double quantisation, about 0.52
    bytes per weight); false keeps fp32 block scales (about 0.56 bytes per weight, slightly more exact)."""
    rank: int = 128
    """Rank r of the low-rank adapters (ReLoRA: 128; the Approximations paper: 256)."""
    alpha: float = 32.0
    """Adapter scale numerator: the adapter adds (alpha / rank) * B @ A (ReLoRA's code uses alpha 32)."""
    dropout: float = 0.0
    """Dropout on the adapter branch's input."""
    target_modules: list[str] = field(default_factory=lambda: list(LOWRANK_TARGETS))
    """Linear layers that get adapters: glob patterns matched against the module's name or its last component;
    embeddings, norms and the LM head always train full-rank."""
    reset_every: int = 5000
    """Steps between merge-and-reinit restarts (ReLoRA family; lora never restarts)."""
    warm_start_steps: int = 0
    """Full-rank steps before the low-rank phase begins (ReLoRA's warm start); 0 starts low-rank."""
    restart_warmup_steps: int = 100
    """After each restart (and the warm-start switch) the learning rate restarts from 0 and rises linearly back
    onto the schedule over this many steps (the jagged schedule)."""
    optimizer_reset: Literal["magnitude", "magnitude_joint", "random", "full", "none"] = "magnitude_joint"
    """What a restart does to the adapters' Adam moments: magnitude_joint zeroes the entries with the smallest
    second moment in both moments (one mask); magnitude prunes each moment on its own (ReLoRA's code; unstable:
    see docs/methods.md); random prunes at random; full zeroes them all; none keeps them."""
    prune_ratio: float = 0.99
    """Fraction of each adapter moment tensor zeroed by a magnitude or random reset."""
    qr_residual: bool = False
    """reloqra only: subtract the QR factors from the base (function-preserving) instead of the paper's literal
    eq. 5, which adds them to the weight at every restart."""

    def validate(self) -> None:
        require(self.rank >= 1, f"method.rank must be >= 1; got {self.rank}")
        require(self.alpha > 0, f"method.alpha must be > 0; got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"method.dropout must be in [0, 1); got {self.dropout}")
        require(self.reset_every >= 1, f"method.reset_every must be >= 1; got {self.reset_every}")
        require(self.warm_start_steps >= 0, f"method.warm_start_steps must be >= 0; got {self.warm_start_steps}")
        require(
            self.restart_warmup_steps >= 0,
            f"method.restart_warmup_steps must be >= 0; got {self.restart_warmup_steps}",
        )
        require(0.0 <= self.prune_ratio <= 1.0, f"method.prune_ratio must be in [0, 1]; got {self.prune_ratio}")
        require(bool(self.target_modules), "method.target_modules is empty; name at least one linear layer pattern")
        require(
            self.base_dtype in QUANT_FORMATS or self.base_master == "host",
            f"method.base_master={self.base_master} applies to a quantised base only; set method.base_dtype to "
            "int8, nf4 or fp8, or drop method.base_master",
        )
        require(
            self.nf4_double_quant or self.base_dtype == "nf4",
            "method.nf4_double_quant=false applies to method.base_dtype=nf4 only; drop it or set base_dtype=nf4",
        )


def matches_target(name: str, patterns: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def target_linears(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Linear]]:
    """The plain linear layers (the LM head excepted) a method's ``method.target_modules`` names, by their names;
    one ConfigError line if there are none."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name != "lm_head" and matches_target(name, patterns)
    ]
    if not targets:
        raise ConfigError(
            f"method.target_modules={patterns} matches no linear layer; use names such as "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    return targets


def lowrank_layers(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


class LowRankMethod(Method):
    """Shared driver of the ReLoRA family; subclasses set the kind and whether restarts happen."""

    kind: ClassVar[str]
    restarts: ClassVar[bool]
    metric_prefix: ClassVar[str] = "relora"
    has_phases = True  # full-rank warm start, then low-rank
    settings_class = LowRankSettings
    config_keys = (
        "base_dtype",
        "base_master",
        "nf4_double_quant",
        "rank",
        "alpha",
        "dropout",
        "target_modules",
        "warm_start_steps",
        "restart_warmup_steps",
    )
    RESTART_KEYS = ("reset_every", "optimizer_reset", "prune_ratio")
    resume_keys = ("rank", "target_modules", "base_dtype", "base_master", "nf4_double_quant")

    def __init__(self, cfg: LowRankSettings, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> None:
        super().__init__(cfg, optim_cfg=optim_cfg, total_steps=total_steps, seed=seed)
        self.base_format = cfg.base_dtype if cfg.base_dtype in QUANT_FORMATS else None
        self.base_dtype = _BASE_DTYPES.get(cfg.base_dtype)  # None: fp32 (also the exact master of a quantised base)
        self.restart_count = 0
        self.lowrank_phase = cfg.warm_start_steps == 0
        self.param_access: ParamAccess = LOCAL_ACCESS

    @classmethod
    def planned_events(cls, settings: LowRankSettings) -> PlannedEvents:
        """A warm start switches after step 0; restarts (merge, requantise, optimizer reset) follow each step."""
        overrides = {"reset_every": 1} if cls.restarts else {}
        if settings.warm_start_steps > 0:
            overrides["warm_start_steps"] = 1
        return PlannedEvents(overrides=overrides)

    @classmethod
    def traits(cls, settings: LowRankSettings) -> MethodTraits:
        warm = settings.warm_start_steps > 0
        base = f"method.base_dtype={settings.base_dtype}"
        return MethodTraits(
            changes_trainable_set="method.warm_start_steps > 0" if warm else None,
            quantised_base=base if settings.base_dtype in QUANT_FORMATS else None,
            base_dtype_changes=f"{base} with method.warm_start_steps > 0"
            if warm and settings.base_dtype == "bf16"
            else None,
        )

    def set_param_access(self, model: nn.Module, access: ParamAccess) -> None:
        """Route whole-tensor reads and writes through ``access`` (e.g. DeepSpeed ZeRO partitions)."""
        self.param_access = access
        for _, layer in lowrank_layers(model):
            layer.param_access = access

    # -- model ------------------------------------------------------------------------------------------------

    def convert(self, model: nn.Module) -> None:
        for name, linear in target_linears(model, self.cfg.target_modules):
            parent_name, _, leaf = name.rpartition(".")
            layer = LowRankLinear.from_linear(
                linear,
                rank=self.cfg.rank,
                alpha=self.cfg.alpha,
                kind=self.kind,
                dropout=self.cfg.dropout,
                qr_residual=self.cfg.qr_residual if self.kind == "qr" else False,
                # A full-rank warm start trains the base: it keeps an fp32 master until the switch.
                base_dtype=self.base_dtype if self.lowrank_phase else None,
                base_format=self.base_format,
                base_master=self.cfg.base_master,
                double_quant=self.cfg.nf4_double_quant,
            )
            layer.set_lowrank_active(self.lowrank_phase)
            setattr(model.get_submodule(parent_name), leaf, layer)

    @property
    def init_sharded(self) -> bool:
        # A quantised base replaces the dense weight parameter by its parts in after_init (decompose), and FSDP2
        # fixes a module's parameters when it shards it: such a run starts one block at a time, each sharded
        # after its layers are decomposed.
        return self.base_format is None

    def _generator(self, device: torch.device, salt: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 7919 + salt)

    def after_init(self, model: nn.Module, within: nn.Module | None = None) -> None:
        """Initialise the adapters from the freshly initialised weights (also during a warm start, so every
        tensor holds defined values; they are re-made from the warmed-up weights at the switch). Each layer's
        generator is salted by its index in the whole model, so a block initialised alone gets the same values."""
        inside = {id(m) for m in within.modules()} if within is not None else None
        for i, (_, layer) in enumerate(lowrank_layers(model)):
            if inside is not None and id(layer) not in inside:
                continue
            gen = self._generator(layer.lora_A.device, 1_000_003 * i)
            if self.lowrank_phase:
                layer.decompose(layer.weight, generator=gen)
            else:
                layer.init_adapters_only(generator=gen)

    # -- schedule ---------------------------------------------------------------------------------------------

    def restart_steps(self) -> tuple[int, ...]:
        """First steps trained with fresh adapters: the warm-start switch, then every ``reset_every`` steps."""
        warm = self.cfg.warm_start_steps
        steps = [warm] if warm > 0 else []
        if self.restarts:
            steps += list(range(warm + self.cfg.reset_every, self.total_steps, self.cfg.reset_every))
        return tuple(s for s in steps if s < self.total_steps)

    def lr_schedule(self, base: Schedule) -> Schedule:
        return JaggedSchedule(base, self.restart_steps(), self.cfg.restart_warmup_steps)

    # -- step end ---------------------------------------------------------------------------------------------

    def _switch_to_lowrank(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for i, (_, layer) in enumerate(lowrank_layers(model)):
            layer.set_lowrank_active(True)
            # Quantised bases are quantised here, from the exact warmed-up weight (kept as the master).
            layer.decompose(generator=self._generator(layer.lora_A.device, 1_000_003 * i + 17))
            layer.set_base_dtype(self.base_dtype)  # the warm-start master, stored as the frozen base from now on
        self.lowrank_phase = True
        new = self.build_optimizer(model)
        for group in new.param_groups:
            for p in group["params"]:
                if p in optimizer.state:
                    new.state[p] = optimizer.state[p]
        return new

    def _restart(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self.restart_count += 1
        update_sq = 0.0
        adapters: list[torch.Tensor] = []
        for i, (_, layer) in enumerate(lowrank_layers(model)):
            gen = self._generator(layer.lora_A.device, 1_000_003 * i + 31 * self.restart_count)
            update_sq += layer.restart(generator=gen)
            adapters.extend(layer.adapter_parameters())
        gen = self._generator(torch.device("cpu"), 97 * self.restart_count)
        access = self.param_access
        reset_optimizer_state(
            optimizer,
            adapters,
            mode=self.cfg.optimizer_reset,
            ratio=self.cfg.prune_ratio,
            generator=gen,
            access=access,
        )
        zeros = total = 0
        for p in adapters:
            for key in access.state_keys(optimizer, p):
                value = access.get_state(optimizer, p, key)
                zeros += int((value == 0).sum())
                total += value.numel()
        return {
            f"{self.metric_prefix}/merged_update_norm": update_sq**0.5,
            f"{self.metric_prefix}/pruned_fraction": zeros / total if total else 0.0,
        }

    def on_step_end(self, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepEnd:
        next_step = step + 1
        end = StepEnd()
        if not self.lowrank_phase and next_step == self.cfg.warm_start_steps:
            end.optimizer = self._switch_to_lowrank(model, optimizer)
        elif self.lowrank_phase and self.restarts and next_step in self.restart_steps():
            end.scalars.update(self._restart(model, optimizer))
        prefix = self.metric_prefix
        with torch.no_grad():
            norms = [
                layer.param_access.get(p).float().norm()
                for _, layer in lowrank_layers(model)
                for p in layer.adapter_parameters()
            ]
            adapter_norm = torch.linalg.vector_norm(torch.stack(norms))  # a tensor: read when logged, not here
        end.scalars.update(
            {
                f"{prefix}/restarts": float(self.restart_count),
                f"{prefix}/phase": float(self.lowrank_phase),
                f"{prefix}/adapter_norm": adapter_norm,
            }
        )
        return end

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"restarts": torch.tensor(self.restart_count), "phase": torch.tensor(int(self.lowrank_phase))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.restart_count = int(state["restarts"])
        self.lowrank_phase = bool(int(state["phase"]))

    def apply_phase(self, model: nn.Module) -> None:
        """Put the layers in the phase this method is in (after :meth:`load_state_dict`)."""
        for _, layer in lowrank_layers(model):
            layer.set_lowrank_active(self.lowrank_phase)
            if self.lowrank_phase:
                layer.set_base_dtype(self.base_dtype)
                layer.hold_quantised(values=False)  # the storage the checkpoint holds (values loaded next)
            else:
                layer.hold_dense()

    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each adapted layer's merged weight (base plus its low-rank update) under the plain layer's name."""
        dense: dict[str, torch.Tensor] = {}
        skip = set()
        for name, layer in lowrank_layers(model):
            dense[f"{name}.weight"] = layer.merged_weight(as_computed=True).float()  # the function as trained
            skip.update(f"{name}.{key}" for key in layer.state_dict())  # adapters, factors, quantised parts
        for name, value in model.state_dict().items():
            if name not in skip and name not in dense:
                dense[name] = value.float() if value.is_floating_point() else value
        return dense


class LoRA(LowRankMethod):
    """LoRA over frozen weights, no restarts (a baseline; with warm_start_steps it is 'LoRA + warm start')."""

    name = "lora"
    kind = "lora"
    restarts = False


class ReLoRA(LowRankMethod):
    """LoRA with merge-and-reinit restarts, optimizer pruning and the jagged schedule (Lialin et al.)."""

    name = "relora"
    kind = "lora"
    restarts = True
    config_keys = (*LowRankMethod.config_keys, *LowRankMethod.RESTART_KEYS)


class ReDoRA(LowRankMethod):
    """DoRA re-decomposed from the merged weight at each restart (Approximations paper)."""

    name = "redora"
    kind = "dora"
    restarts = True
    config_keys = (*LowRankMethod.config_keys, *LowRankMethod.RESTART_KEYS)


class RePiSSA(LowRankMethod):
    """PiSSA: the top-r singular part trains, the residual is frozen; re-decomposed at each restart."""

    name = "repissa"
    kind = "pissa"
    restarts = True
    config_keys = (*LowRankMethod.config_keys, *LowRankMethod.RESTART_KEYS)


class ReLoQRa(LowRankMethod):
    """Adapters from the QR decomposition of the current weight (Approximations paper, eq. 5)."""

    name = "reloqra"
    kind = "qr"
    restarts = True
    config_keys = (*LowRankMethod.config_keys, *LowRankMethod.RESTART_KEYS, "qr_residual")


LOWRANK_METHODS = (LoRA, ReLoRA, ReDoRA, RePiSSA, ReLoQRa)
