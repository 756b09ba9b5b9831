"""The interface every training method implements.

The trainer knows methods only through this class: it never tests a method's name, and every hook it may call is
declared here with a default. A method declares the ``method.*`` config fields it reads (:attr:`Method.config_keys`),
converts the model (on the meta device, before parallelisation), says which parameters train, builds the
optimizer, may reshape the learning-rate schedule, reacts at the end of each optimizer step (possibly replacing
the optimizer), may run in phases (:attr:`Method.has_phases`, :meth:`Method.apply_phase`), saves and loads its own
state as tensors, and says what the trained weights are as a plain LLaMA (:meth:`Method.export_weights`).

How to add one: ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from megatron_pept.config import Config, OptimConfig
from megatron_pept.errors import ConfigError
from megatron_pept.optim import Schedule, build_adamw, decay_param_groups
from megatron_pept.traits import MethodTraits


@dataclass
class MethodSettings:
    """Base of a method family's settings: one field per ``method.*`` key, with its type, default and a docstring
    under it (``--help-config`` prints them). A family subclasses it; :meth:`validate` checks ranges and the
    settings against each other (one ConfigError line with the fix)."""

    family: ClassVar[str] = "every method"
    """Who these settings are for, as ``--help-config`` labels their documentation."""

    def validate(self) -> None:
        """Check the settings; the default has nothing to check."""


def require(cond: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``cond`` (for :meth:`MethodSettings.validate`)."""
    if not cond:
        raise ConfigError(message)


@dataclass
class StepEnd:
    """What a method reports after an optimizer step."""

    scalars: dict[str, float | torch.Tensor] = field(default_factory=dict)
    """Values to log, under their full TensorBoard tags (e.g. ``relora/restarts``): floats, or 0-d tensors on the
    device, which the trainer reads on the host once per ``train.log_interval`` (a step never waits for them). A
    tensor handed over is not changed in place afterwards."""
    optimizer: torch.optim.Optimizer | None = None
    """A new optimizer the trainer must use from the next step on (e.g. after a warm-start phase switch)."""


@dataclass(frozen=True)
class PlannedEvents:
    """How the memory planner (:mod:`megatron_pept.plan`) makes a method's events (a restart, a projector refresh,
    a phase switch) happen within its few steps: ``method.*`` settings to use instead of the run's, and the 0-based
    steps whose optimizer step includes one (a projector refresh). Events at a step's end (a ReLoRA restart, the
    warm-start switch) fall in the planner's ``restart/refresh`` phase of :meth:`Method.on_step_end`."""

    overrides: dict[str, Any] = field(default_factory=dict)
    refresh_steps: tuple[int, ...] = ()


class Method:
    """Base class; its defaults are full-rank training with AdamW."""

    name: ClassVar[str]
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    """The dataclass of the method's family settings (the ``method.*`` keys it may read, with their docs)."""
    config_keys: ClassVar[tuple[str, ...]] = ()
    """The ``method.*`` fields (besides ``name``) this method reads, fields of :attr:`settings_class`;
    ``--help-config`` lists them per key and a non-default value of any other key is reported as ignored."""
    resume_keys: ClassVar[tuple[str, ...]] = ()
    """The ``method.*`` fields whose values shape the saved state (a rank, the adapted modules, a base's storage):
    a resume that changes one is refused before anything is loaded or written."""
    resumes_from: ClassVar[tuple[str, ...]] = ()
    """Other ``method.name`` values whose checkpoints this method continues exactly (the same model, method and
    optimizer state; only a schedule differs). Any other change of method on resume is refused."""
    backends: ClassVar[tuple[str, ...] | None] = None
    """The ``parallel.backend`` values this method runs under (config validation refuses the others); None: all."""
    has_phases: ClassVar[bool] = False
    """The method's state says which parameters train (e.g. a full-rank warm start before the low-rank phase):
    after a checkpoint load the trainer calls :meth:`apply_phase` and builds the optimizer again."""

    def __init__(self, cfg: Any, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> None:
        self.cfg = cfg  # an instance of settings_class
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.seed = seed

    @classmethod
    def validate(cls, settings: Any, cfg: Config) -> None:
        """Refuse settings this method cannot run with (``settings``: its :attr:`settings_class`, already
        type-checked; ``cfg``: the whole config), one ConfigError line with the fix. The default checks the
        settings' own ranges."""
        settings.validate()

    @classmethod
    def traits(cls, settings: Any) -> MethodTraits:
        """What these settings make the method do that a backend must know (see :mod:`megatron_pept.traits`)."""
        return MethodTraits()

    @classmethod
    def planned_events(cls, settings: Any) -> PlannedEvents:
        """What the memory planner changes so that this method's events happen within its steps (``settings``:
        the run's :attr:`settings_class`); none by default."""
        return PlannedEvents()

    def convert(self, model: nn.Module) -> None:
        """Rewrite the model in place before it is parallelised or materialised (swap in adapters, freeze)."""

    def set_param_access(self, model: nn.Module, access: object) -> None:
        """Route the method's whole-tensor reads and writes through ``access`` (DeepSpeed ZeRO); most methods
        never touch weights outside the optimizer and ignore it."""

    def after_init(self, model: nn.Module, within: nn.Module | None = None) -> None:
        """Called once the model's weights hold their initial values (e.g. to decompose them). The model may
        already be sharded (FSDP2, see :attr:`init_sharded`): reach whole tensors through
        :class:`~megatron_pept.sharding.ParamAccess`, one at a time. ``within``: only that block's layers (the
        block was just materialised and initialised on its own; the rest of the model is still on the meta
        device): called so for each block in turn where :attr:`init_sharded` is False under FSDP2."""

    @property
    def init_sharded(self) -> bool:
        """:meth:`after_init` works on a model the backend sharded before it was materialised (FSDP2): the model
        is then never whole on any rank. False: a method whose ``after_init`` changes which tensors the layers
        hold (a quantised base replaces the dense weight); under FSDP2 each block is then materialised,
        initialised, given to ``after_init(model, within=block)`` and sharded in turn, so a rank holds the
        sharded blocks plus one whole block at most."""
        return True

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        groups = decay_param_groups(self.trainable_parameters(model), weight_decay=self.optim_cfg.weight_decay)
        return build_adamw(groups, self.optim_cfg)

    def lr_schedule(self, base: Schedule) -> Schedule:
        """The schedule this method trains with, given the configured one."""
        return base

    def on_step_end(self, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepEnd:
        """Called after optimizer step ``step`` (0-based); may return scalars to log and an optimizer to use from
        the next step on (the trainer swaps it in through the backend)."""
        return StepEnd()

    def apply_phase(self, model: nn.Module) -> None:
        """Put the model in the phase :meth:`load_state_dict` restored (only called when :attr:`has_phases`)."""

    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained weights as a plain LLaMA's ``state_dict`` (adapters merged into their weights), fp32."""
        return {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state but the checkpoint has {sorted(state)}")
