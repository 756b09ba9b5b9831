"""The memory plan of a run: the real trainer's start-up and steps run on fake tensors, counted by PyTorch's memory
tracker, phase by phase.

What runs is :class:`~megatron_pept.trainer.Trainer`'s own ``_build_model`` and ``train_step`` (the method, the
backend, the optimizer, per-layer updates, activation checkpointing, bf16 weights: all as in a run), under
:func:`~megatron_pept.plan.fake.fake_tensors` and, for N ranks, :func:`~megatron_pept.plan.fake.fake_world`. Only
the data is made up (random token ids of the run's shape) and nothing is written. The tracker
(``torch.distributed._tools.mem_tracker.MemTracker``) sees every tensor storage made or freed and sorts them into
weights (parameters and buffers: frozen and quantised bases too), gradients, optimizer state, activations (made
in forward, kept for backward), temporaries (made in backward: gradients of activations, FSDP2's reduce buffers)
and other (inputs).

Phases: ``start-up`` (materialise, initialise, quantise, shard, build the optimizer), then for each of
:data:`PLAN_STEPS` steps ``forward``, ``backward`` (per-layer updates step inside it), ``optimizer step`` (or
``optimizer step + refresh`` where the method renews its projector), ``restart/refresh`` (the method's step end: a
ReLoRA restart, a warm-start switch), and ``checkpoint save`` (the state dict DCP writes, assembled; the write
itself goes through host memory). Methods make their events happen within those steps through
:meth:`~megatron_pept.methods.base.Method.planned_events`.

The device: a run planned for CUDA (``train.device`` auto or cuda) computes as it would there (``train.dtype=auto``
is bf16, FSDP2 gets its bf16 mixed-precision policy) on fake CPU tensors, which have the same sizes. Attention
runs through SDPA's fused kernel, which keeps O(sequence) per head as flash-attn and the memory-efficient kernels
do: the planned bytes hold for ``model.attention`` flash, te and sdpa alike.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

import torch

from megatron_pept import registry
from megatron_pept.config import Config
from megatron_pept.errors import ConfigError
from megatron_pept.study.memory import TRACKED_PARTS, tracked_parts

PLAN_STEPS = 3
"""Steps planned: the first makes the optimizer state, later ones hold it; events are placed in them."""

GIB = 2**30
PART_NAMES = TRACKED_PARTS
PHASES = (
    "start-up",
    "forward",
    "backward",
    "optimizer step",
    "optimizer step + refresh",
    "restart/refresh",
    "checkpoint save",
)


@dataclass
class PhasePeak:
    """The largest total reached in one phase of one step (``step`` 0-based; None for start-up)."""

    phase: str
    step: int | None
    peak_bytes: int
    parts: dict[str, int]

    @property
    def label(self) -> str:
        return self.phase if self.step is None else f"{self.phase} (step {self.step + 1})"


@dataclass
class Plan:
    """Bytes one rank holds; see :func:`plan`."""

    settings: dict[str, Any]
    """What was planned: model, method, backend, ranks, batch, dtypes ..."""
    how: str
    """How the numbers were obtained (fake tensors, or computed from another plan)."""
    peak_bytes: int
    peak_phase: str
    parts: dict[str, int]
    """Each part at the moment of the peak."""
    largest: dict[str, int]
    """The largest each part was at the peak of any phase (they need not coincide)."""
    phases: list[PhasePeak]
    overrides: list[str] = field(default_factory=list)
    """Settings the planner changed to place the method's events within its steps."""
    notes: list[str] = field(default_factory=list)
    host_reads_guessed: int = 0
    seconds: float = 0.0
    params: int = 0
    """Parameters of the model (whole, over all ranks)."""
    trainable_params: int = 0
    param_bytes_each: int = 4
    """Bytes of one trainable parameter (4 for fp32 weights, 2 for bf16)."""
    trainable_grad_bytes: int = 0
    largest_block_params: int = 0

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GIB

    def phase_peaks(self) -> dict[str, PhasePeak]:
        """The largest peak of each phase name over the steps, in the order of :data:`PHASES`."""
        out: dict[str, PhasePeak] = {}
        for p in self.phases:
            if p.phase not in out or p.peak_bytes > out[p.phase].peak_bytes:
                out[p.phase] = p
        order = {name: i for i, name in enumerate(PHASES)}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak_gb"] = self.peak_gb
        out["phases"] = [{**asdict(p), "label": p.label} for p in self.phases]
        return out


def _phase_tracker(device: torch.device) -> Any:
    from torch.distributed._tools.mem_tracker import _MemRefType

    from megatron_pept.study.memory import step_tracker_class

    class PhaseTracker(step_tracker_class()):
        """The study's step tracker, also keeping the peak of each (phase, step); what is made during start-up
        outside any optimizer counts as weights (the parameters, until the model is registered)."""

        def __init__(self) -> None:
            super().__init__()
            self.phase, self.step = "start-up", None
            self.peaks: dict[tuple[str, int | None], PhasePeak] = {}
            self.device = device

        def _track(self, reftype: Any, t: torch.Tensor) -> None:
            if self.phase == "start-up" and reftype == _MemRefType.ACT:
                reftype = _MemRefType.PARAM
            super()._track(reftype, t)

        def _update_peak_stats(self, peak_state: Any) -> None:
            # Runs after every operation. MemTracker's own walks every module's statistics each time (quadratic in
            # a 7B model's ~300 modules); a plan needs only the device's peak and each phase's.
            snap = self._curr_mem_snap.get(self.device)
            if not snap:
                return
            total = int(snap["Total"])
            key = (self.phase, self.step)
            held = self.peaks.get(key)
            if held is None or total > held.peak_bytes:  # the plan's peak is the largest of these
                self.peaks[key] = PhasePeak(self.phase, self.step, total, tracked_parts(snap))

        def enter(self, phase: str) -> None:
            """Count in ``phase`` (of :attr:`step`) from now on; a phase's peak is at least what is held as it
            starts."""
            self.phase = phase
            key = (phase, self.step)
            self.peaks.setdefault(key, PhasePeak(phase, self.step, self.current_total(), self.current_parts()))

        def current_total(self) -> int:
            snap = self._curr_mem_snap.get(self.device)
            return int(snap["Total"]) if snap else 0

        def current_parts(self) -> dict[str, int]:
            snap = self._curr_mem_snap.get(self.device, {})
            return tracked_parts(snap)

    return PhaseTracker()


class _RandomTokens:
    """A loader of random token ids of the run's micro-batch shape (a plan's data: only its shape matters)."""

    def __init__(self, *, micro_batch_size: int, seq_len: int, vocab_size: int) -> None:
        self.shape, self.vocab_size = (micro_batch_size, seq_len), vocab_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, self.vocab_size, (self.shape[0], self.shape[1] + 1))
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


def _planned_trainer_class() -> type:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from megatron_pept.metrics import MetricsWriter
    from megatron_pept.models import llama_args
    from megatron_pept.trainer import Trainer

    class PlannedTrainer(Trainer):
        """The trainer's model build and step, with made-up data and nothing written (no run folder, lock,
        checkpoint or TensorBoard)."""

        def __init__(self, cfg: Config, *, backend: Any, vocab_size: int, target_device_type: str) -> None:
            self.cfg = cfg
            self.backend = backend
            self.backend.target_device_type = target_device_type
            self.dims = self.backend.dims
            self._build_batches()
            self.model_args = llama_args(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len)
            self.loader = _RandomTokens(
                micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len, vocab_size=vocab_size
            )
            self._build_model()
            self.writer = MetricsWriter(cfg.run_dir, enabled=False)

        def _meta_model(self) -> torch.nn.Module:
            with unset_fake_temporarily():  # real meta tensors, which to_empty turns into fake ones
                return super()._meta_model()

    return PlannedTrainer


def accumulation_steps(cfg: Config, *, ranks: int) -> int:
    """Micro-batches per optimizer step of ``cfg`` on ``ranks`` data-parallel ranks."""
    t = cfg.train
    return max(1, t.global_batch_size // (t.micro_batch_size * ranks))


def vocab_size_of(cfg: Config) -> int:
    """``model.vocab_size``, else the vocabulary of the tokenized data at ``data.path`` if it is there, else
    the papers' 32000."""
    from megatron_pept.models import DEFAULT_VOCAB_SIZE

    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size)
    path = Path(str(cfg.data.path)) if cfg.data.path else None
    if path is not None and path.is_dir():
        from megatron_pept.data.shards import read_index

        with contextlib.suppress(Exception):  # no index there (raw text, a dataset name): the default
            return int(read_index(path).vocab_size)
    return DEFAULT_VOCAB_SIZE


def planning_config(cfg: Config, *, ranks: int = 1) -> tuple[Config, list[str], tuple[int, ...], str]:
    """The config a plan runs: ``cfg`` with :data:`PLAN_STEPS` steps, nothing written, fake CPU tensors standing for
    the target device, attention through SDPA, and the method's events moved into the planned steps. Returns (the
    config, the method settings changed, the steps whose optimizer step refreshes, the target device type)."""
    from megatron_pept.config import to_dict as config_to_dict
    from megatron_pept.methods import method_class, method_settings

    target = "cpu" if cfg.train.device == "cpu" else "cuda"
    raw = config_to_dict(cfg)
    settings, _ = method_settings(cfg.method)
    events = method_class(cfg.method.name).planned_events(settings)
    raw["method"].update(events.overrides)
    raw["train"].update(steps=PLAN_STEPS, device="cpu", compile=False, profile_steps=None, eval_at_start=False)
    # Two micro-batches hold what any number does (the accumulated gradients beside the next one's activations).
    if accumulation_steps(cfg, ranks=ranks) > 2:
        raw["train"]["global_batch_size"] = 2 * cfg.train.micro_batch_size * ranks
    if raw["train"]["dtype"] == "auto":
        raw["train"]["dtype"] = "bf16" if target == "cuda" or raw["train"]["param_dtype"] == "bf16" else "fp32"
    raw["model"]["attention"] = "sdpa"
    raw["model"]["init_from"] = None  # the same tensors, made instead of read
    raw["checkpoint"].update(interval=0, resume="none")
    raw["metrics"]["tensorboard"] = False
    changed = [f"method.{k}={v}" for k, v in events.overrides.items()]
    return registry.config_from_dict(raw), changed, events.refresh_steps, target


def plan(cfg: Config, *, ranks: int = 1) -> Plan:
    """Plan ``cfg`` (a validated config) on ``ranks`` data-parallel ranks: per-rank bytes of each part at the
    peak, the peak's phase, and each phase's peak. ``parallel.backend=deepspeed`` is computed from the
    one-process plan, and so is ``ddp`` (:mod:`megatron_pept.plan.computed`)."""
    from megatron_pept.distributed import backend_class

    cls = backend_class(cfg.parallel.backend)
    if ranks < 1:
        raise ConfigError(f"--ranks must be >= 1; got {ranks}")
    if ranks > 1 and not cls.uses_process_group:
        raise ConfigError(
            f"--ranks {ranks} needs a data-parallel backend; add parallel.backend=fsdp2 (or ddp, or deepspeed)"
        )
    if cfg.parallel.backend in ("ddp", "deepspeed"):
        from megatron_pept.plan.computed import plan_ddp, plan_zero

        return (plan_ddp if cfg.parallel.backend == "ddp" else plan_zero)(cfg, ranks=ranks)
    return _plan_fake(cfg, ranks=ranks, world=cls.uses_process_group)


def _plan_fake(cfg: Config, *, ranks: int, world: bool) -> Plan:
    from megatron_pept.checkpoint.state import checkpoint_state
    from megatron_pept.distributed import build_backend
    from megatron_pept.plan.fake import fake_tensors, fake_world

    started = time.perf_counter()
    run_cfg, changed, refresh_steps, target = planning_config(cfg, ranks=ranks)
    vocab = vocab_size_of(cfg)
    device = torch.device("cpu")
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # MemTracker looks at every optimizer state value, and some are None (a lazily made buffer)
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        if world:
            stack.enter_context(fake_world(ranks))
        backend = build_backend(run_cfg)  # real: the device mesh is made from real tensors
        reads = stack.enter_context(fake_tensors())
        tracker = _phase_tracker(device)
        stack.enter_context(tracker)
        trainer = _planned_trainer_class()(run_cfg, backend=backend, vocab_size=vocab, target_device_type=target)
        tracker.roots = [trainer.raw_model, trainer.model]
        tracker.track_external(trainer.raw_model, *_torch_optimizers(trainer.optimizer))
        _instrument(trainer, tracker, refresh_steps)
        for step in range(PLAN_STEPS):
            tracker.step = step
            tracker.enter("forward")
            trainer.train_step()
        tracker.enter("checkpoint save")
        state = checkpoint_state(trainer.raw_model, trainer.optimizer, trainer._checkpoint_parts(), native=False)
        del state
        phases = sorted(tracker.peaks.values(), key=lambda p: -1 if p.step is None else p.step)
        guessed = reads.guessed
        counts = _parameter_counts(trainer)
        del trainer
    at_peak = max(phases, key=lambda p: p.peak_bytes)
    largest_parts = {name: 0 for name in PART_NAMES}
    for p in phases:
        for name, nbytes in p.parts.items():
            largest_parts[name] = max(largest_parts[name], nbytes)
    return Plan(
        settings=describe(cfg, ranks=ranks, vocab_size=vocab, target=target, compute_dtype=run_cfg.train.dtype),
        how=f"fake tensors: the trainer's start-up and {PLAN_STEPS} steps, counted by torch's MemTracker"
        + (f", rank 0 of {ranks} on a fake process group" if world else ""),
        peak_bytes=at_peak.peak_bytes,
        peak_phase=at_peak.label,
        parts=at_peak.parts,
        largest=largest_parts,
        phases=phases,
        overrides=changed,
        host_reads_guessed=guessed,
        seconds=time.perf_counter() - started,
        **counts,
    )


def _parameter_counts(trainer: Any) -> dict[str, int]:
    model = trainer.raw_model
    trainable = [p for _, p in trainer.method.trainable_parameters(model)]
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers.values()]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "param_bytes_each": trainable[0].element_size() if trainable else 4,
        "trainable_grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "largest_block_params": max(blocks, default=0),
    }


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside ``optimizer`` (itself, or the per-parameter ones of per-layer updates)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return [o for inner in getattr(optimizer, "optimizers", {}).values() for o in _torch_optimizers(inner)]


def _instrument(trainer: Any, tracker: Any, refresh_steps: tuple[int, ...]) -> None:
    """Name the phases of the trainer's step as its backend and method run them: forward until a micro-batch's
    backward, backward during it; after the last micro-batch's backward the gradients are the optimizer step's
    (their norm, clipping, the step), then the method's step end is ``restart/refresh``."""

    def step_label() -> str:
        return "optimizer step + refresh" if tracker.step in refresh_steps else "optimizer step"

    backend, method = trainer.backend, trainer.method
    backward, step, on_step_end = backend.backward, backend.step, method.on_step_end

    def planned_backward(loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        tracker.enter("backward")
        out = backward(loss, last=last)
        tracker.enter(step_label() if last else "forward")
        return out

    @wraps(step)
    def planned_step(*args: Any, **kwargs: Any) -> Any:
        tracker.enter(step_label())
        return step(*args, **kwargs)

    @wraps(on_step_end)
    def planned_step_end(*args: Any, **kwargs: Any) -> Any:
        tracker.enter("restart/refresh")
        return on_step_end(*args, **kwargs)

    backend.backward, backend.step, method.on_step_end = planned_backward, planned_step, planned_step_end


def describe(cfg: Config, *, ranks: int, vocab_size: int, target: str, compute_dtype: str) -> dict[str, Any]:
    t = cfg.train
    return {
        "model": cfg.model.name,
        "vocab_size": vocab_size,
        "method": cfg.method.name,
        "backend": cfg.parallel.backend,
        "zero_stage": cfg.parallel.zero_stage if cfg.parallel.backend == "deepspeed" else None,
        "ranks": ranks,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "grad_accum_steps": accumulation_steps(cfg, ranks=ranks),
        "param_dtype": t.param_dtype,
        "compute_dtype": compute_dtype,
        "state_dtype": cfg.optim.state_dtype,
        "per_layer": cfg.optim.per_layer,
        "activation_checkpointing": t.activation_checkpointing,
        "device": target,
    }
