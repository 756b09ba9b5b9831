"""The trainer: builds the parts from a :class:`Config`, owns the train state and runs one step body for every
backend. It names no method and no backend: methods are reached through :class:`~megatron_pept.methods.Method`,
parallelism through :class:`~megatron_pept.distributed.Backend`, optimizers through the shard-aware protocol
(:func:`~megatron_pept.sharding.optimizer_protocol`). The path of a step through the files: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_pept import guard, registry
from megatron_pept.checkpoint import Checkpointer, checkpoint_root, lock_run_folders, run_meta
from megatron_pept.checkpoint.export import read_meta
from megatron_pept.checkpoint.resume import check_compatible
from megatron_pept.config import Config, profile_range, save_config
from megatron_pept.data.build import build_run_data, check_same_tokenizer
from megatron_pept.distributed import build_backend, comm
from megatron_pept.errors import ConfigError, UserError
from megatron_pept.evaluation import validation_loss
from megatron_pept.faults import fault_point
from megatron_pept.methods import build_method
from megatron_pept.metrics import (
    MetricsWriter,
    device_memory_gb,
    log_step,
    peak_memory_gb,
    peak_tflops,
    setup_console_logging,
)
from megatron_pept.metrics.profile import PROFILE_FOLDER, StepProfiler
from megatron_pept.metrics.timing import StepTimer
from megatron_pept.models import build_model, llama_args
from megatron_pept.models.hf_import import load_hf_weights
from megatron_pept.models.loss import cross_entropy_loss
from megatron_pept.optim import build_schedule
from megatron_pept.optim.per_layer import PerLayerOptimizer
from megatron_pept.optim.weight_update import WeightUpdate, attach_weight_update
from megatron_pept.sharding import local_rows, optimizer_protocol
from megatron_pept.signals import StopSignals
from megatron_pept.train_state import TrainResult, TrainState

logger = logging.getLogger("megatron_pept")

__all__ = ["Trainer", "TrainResult", "TrainState", "cross_entropy_loss", "initialise_model"]


def hold_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make every fp32 parameter of ``model`` a ``dtype`` one (frozen ones too; quantised bases, which are not fp32
    parameters, stay as they are), buffers untouched. Through the modules' own cast (``Module._apply``), so a
    module that keeps some tensors' dtypes under any cast (Q-GaLore's int8 layer, its scales fp32) keeps them here
    too, and tied weights stay tied. Meant for a model on the meta device."""
    params = {id(p) for p in model.parameters()}
    model._apply(lambda t: t.to(dtype) if id(t) in params and t.dtype == torch.float32 else t)


def compute_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make each module of ``model`` compute with its own low-precision parameters cast to ``dtype`` (bf16 weights
    computed in fp32: ``train.param_dtype=bf16`` with ``train.dtype=fp32``). A forward pre-hook puts a ``dtype``
    copy of each bf16 parameter in the module's place for its forward and the post-hook puts the parameter back,
    so autograd returns each gradient to the bf16 parameter, rounded once from the fp32 one. The copies live from
    a module's forward to its backward, as autocast's casts do (activation checkpointing frees and remakes them).
    The hooks are the innermost ones (registered on the leaf modules that hold the weights): a backend's own
    hooks (FSDP2 gathering a block's shards) run around them."""

    def upcast(module: torch.nn.Module, args: Any) -> None:
        saved = {}
        for name, p in module._parameters.items():
            if p is not None and p.dtype == torch.bfloat16:
                saved[name] = p
                module._parameters[name] = p.to(dtype)  # a tensor in the parameter's slot, for this forward only
        module._weights_held = saved

    def restore(module: torch.nn.Module, args: Any, output: Any) -> None:
        module._parameters.update(module.__dict__.pop("_weights_held", {}))

    for module in model.modules():
        if any(p is not None and p.dtype == torch.bfloat16 for p in module._parameters.values()):
            module.register_forward_pre_hook(upcast)
            module.register_forward_hook(restore, always_call=True)


def initialise_model(
    model: torch.nn.Module,
    *,
    seed: int,
    device: torch.device,
    init_from: str | None,
    method: Any,
    skip: torch.nn.Module | None = None,
) -> None:
    """Materialise a model built on the meta device (and converted by ``method``; possibly already sharded by the
    backend) on ``device`` and give it its initial weights as every run does: each weight from a seed of its own
    (derived from ``seed`` and its name), only the rows this process holds; then the Hugging Face weights of
    ``init_from`` if set, one tensor at a time; then the method's ``after_init``. The weights do not depend on the
    layout (one process, DDP replicas, FSDP2 shards). ``skip``: a part already initialised
    (:func:`initialise_block`), left as it is."""
    if skip is None:
        model.to_empty(device=device)
    else:  # only what is still on the meta device
        model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    model.init_weights(seed=seed, rows_of=local_rows, skip=skip)
    if init_from:  # before the method makes its adapters or projections from the weights
        load_hf_weights(model, init_from, rows_of=local_rows, skip=skip)
    if skip is None:
        method.after_init(model)


def initialise_block(
    model: torch.nn.Module,
    block: torch.nn.Module,
    *,
    seed: int,
    device: torch.device,
    init_from: str | None,
    method: Any,
) -> None:
    """Materialise and initialise one block of ``model`` whole, as :func:`initialise_model` would (the same
    values), and give it to the method's ``after_init``: the start-up of a method whose ``after_init`` must see
    whole layers (a quantised base) under FSDP2, which shards each block right after (the backend's
    ``prepare_block``)."""
    block.to_empty(device=device)
    model.init_weights(seed=seed, within=block)
    if init_from:
        load_hf_weights(model, init_from, within=block)
    method.after_init(model, within=block)


class Trainer:
    """Builds a run from its config and trains it. It holds the run's folders locked from the start (one run per
    run_dir, see :mod:`megatron_pept.checkpoint.lock`) until :meth:`close` or the end of the process; a run refused
    while being built (bad data, a mismatched checkpoint ...) leaves its folders as it found them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = registry.resolve(cfg)  # the method's settings and the backend's conditions, whatever read cfg
        registry.check_runtime(cfg)  # what this machine can run (the attention kernel on its device and dtype)
        self.backend = build_backend(cfg)
        self.dims = self.backend.dims
        setup_console_logging(is_main=self.dims.is_main)
        self.lock, self.run_id = lock_run_folders(
            [Path(cfg.run_dir), checkpoint_root(cfg.checkpoint, run_dir=cfg.run_dir)], rank=self.dims.rank
        )
        try:
            self._build()
        except BaseException:
            self.lock.abandon()
            raise

    def close(self) -> None:
        """Release the run's folders (the end of the process does too)."""
        self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def model(self) -> Any:
        """What forward calls: the model itself, or the backend's wrapper or engine around it."""
        return self.backend.model

    def _build(self) -> None:
        self._build_batches()
        self._build_data()
        self.model_args = llama_args(
            self.cfg.model, vocab_size=self.data_index.vocab_size, max_seq_len=self.cfg.data.seq_len
        )
        self.data.check_vocabulary(self.model_args.vocab_size)  # every token id has an embedding row
        self._build_model()
        self._build_run()

    def _build_batches(self) -> None:
        """Micro-batches per step from the batch sizes and the data-parallel ranks."""
        t = self.cfg.train
        self.compute_dtype = self.backend.compute_dtype
        torch.manual_seed(t.seed)
        global_micro = t.micro_batch_size * self.dims.dp_world_size
        if t.global_batch_size % global_micro:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x {self.dims.dp_world_size} data-parallel ranks; "
                f"use a multiple of {global_micro}"
            )
        self.grad_accum_steps = t.global_batch_size // global_micro

    def _build_data(self) -> None:
        """The run's data: its index (the vocabulary), this rank's loader and the validation windows."""
        cfg = self.cfg
        self.data = build_run_data(cfg, self.dims)
        self.data_index = self.data.index
        self.loader = self.data.loader(cfg, self.dims)
        self.val_batches = self.data.val_batches(cfg, self.dims)

    def _build_model(self) -> None:
        """Method, model (of ``self.model_args``), backend wrapping, initial weights, optimizer, schedule and train
        state: all that a step needs besides data (the memory planner, :mod:`megatron_pept.plan`, runs exactly
        this under fake tensors)."""
        cfg = self.cfg
        t, d = cfg.train, cfg.data
        # Model: meta -> method conversion -> materialise -> initialise -> parallelise.
        self.method = build_method(cfg.method, optim_cfg=cfg.optim, total_steps=t.steps, seed=t.seed)
        model = self._meta_model()
        if t.param_dtype == "bf16" and self.backend.compute_dtype == torch.float32:
            compute_weights_in(model, torch.float32)  # bf16 weights computed in fp32 (train.dtype=fp32)
        model.model.activation_checkpointing = t.activation_checkpointing
        if t.compile:
            for layer in model.model.layers.values():
                layer.compile()
        self.raw_model = model  # what methods, optimizers and checkpoints see (sharded in place by FSDP2)
        # A backend that shards the meta model (FSDP2) does so first: each rank then allocates and fills only its
        # own rows, never the whole model. A method that must see whole layers while initialising (a quantised
        # base) gets them one block at a time, each block sharded right after; the rest is sharded on meta.
        init = dict(seed=t.seed, device=self.device, init_from=cfg.model.init_from, method=self.method)
        if self.backend.shards_on_meta:
            prepare = None if self.method.init_sharded else partial(initialise_block, model, **init)
            self.backend.wrap(model, grad_accum_steps=self.grad_accum_steps, prepare_block=prepare)
            blocks = None if prepare is None else model.model.layers
            initialise_model(model, **init, skip=blocks)
        else:
            initialise_model(model, **init)
            self.backend.wrap(model, grad_accum_steps=self.grad_accum_steps)
        self.optimizer: Any = None
        self.weight_update = self._weight_update(model)
        self._use_optimizer(self.method.build_optimizer(model), replacing=False)

        self.schedule = self.method.lr_schedule(build_schedule(cfg.optim, total_steps=t.steps))
        self.state = TrainState()
        self.tokens_per_step = t.global_batch_size * d.seq_len

    def _meta_model(self) -> torch.nn.Module:
        """The model on the meta device, converted by the method, its weights in ``train.param_dtype``."""
        model = build_model(self.model_args)
        self.method.convert(model)
        if self.cfg.train.param_dtype == "bf16":
            hold_weights_in(model, torch.bfloat16)  # still on the meta device: nothing is ever held in fp32
        return model

    def _build_run(self) -> None:
        """The step timer, checkpoints (and resuming from one), TensorBoard and the run folder's files."""
        cfg = self.cfg
        t, d = cfg.train, cfg.data
        model = self.raw_model
        self.timer = StepTimer(
            tokens_per_step=self.tokens_per_step,
            flops_per_token=self.model_args.flops_per_token(d.seq_len),
            peak_flops=peak_tflops(self.device, override=cfg.metrics.peak_tflops) * 1e12,
            device=self.device,
        )
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            run_dir=cfg.run_dir,
            rank=self.dims.rank,
            world_size=self.dims.world_size,
            run_id=self.run_id,
        )
        self._last_saved_step: int | None = None  # the step of the newest checkpoint saved or loaded by this run
        self.resumed_from: Path | None = self.checkpointer.resolve_resume()
        if self.resumed_from is not None:
            saved = read_meta(self.resumed_from)
            check_compatible(self.resumed_from, saved, cfg, self.method)  # before anything is loaded or written
            check_same_tokenizer(
                self.resumed_from,
                saved.get("tokenizer", {}).get("sha256"),
                self.data_index,
                allow_change=d.allow_tokenizer_change,
            )
            self._load_checkpoint(self.resumed_from)
        self.checkpointer.preflight(run_dir=Path(cfg.run_dir), checkpoint_bytes=self._checkpoint_bytes())
        # The run is accepted (config, data, model and checkpoint agree): only now does it write into run_dir, so a
        # refused run leaves run_dir as it found it.
        self.writer = MetricsWriter(cfg.run_dir, enabled=cfg.metrics.tensorboard and self.dims.is_main)
        if self.dims.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
            self.data.verified_shards.save()
        self.checkpointer.accept(resumed_from=self.resumed_from)  # the run's id, in run_dir/run.json
        logger.info(
            "model %s: %.2fM parameters (%.2fM trainable), method %s, %s on %s, %d micro-batches of %d x %d tokens "
            "per step (%d tokens), %d train windows",
            *(cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6),
            *(sum(p.numel() for p in self._trainable()) / 1e6, self.method.name),
            *(str(self.compute_dtype).removeprefix("torch."), self.device, self.grad_accum_steps),
            *(t.micro_batch_size, d.seq_len, self.tokens_per_step, self.data.train_windows),
        )

    def _use_optimizer(self, optimizer: Any, *, replacing: bool) -> None:
        """Train with ``optimizer`` from now on (wrapped for per-layer updates); the backend adapts to it."""
        if replacing:
            optimizer_protocol(self.optimizer).release()
        if self.weight_update is not None:  # before a per-layer split, which copies it to every part
            attach_weight_update(optimizer, self.weight_update)
        if self.cfg.optim.per_layer:
            optimizer = PerLayerOptimizer(optimizer, grad_reduce=self.backend.grad_reduce_hook())
        self.optimizer = optimizer
        self.backend.use_optimizer(optimizer, replacing=replacing)
        self.method.set_param_access(self.raw_model, self.backend.access)

    def _weight_update(self, model: torch.nn.Module) -> WeightUpdate | None:
        """How updates are rounded into bf16 weights (``optim.weight_update``); None for fp32 weights."""
        rule = self.cfg.optim.weight_update
        if self.cfg.train.param_dtype != "bf16":
            if rule != "auto":
                logger.info("optim.weight_update=%s is ignored: the weights are fp32 (train.param_dtype=fp32)", rule)
            return None
        names = {p: name for name, p in model.named_parameters()}
        return WeightUpdate("stochastic" if rule == "auto" else rule, seed=self.cfg.train.seed, names=names)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.method.trainable_parameters(self.raw_model)]

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _checkpoint_parts(self) -> dict:
        return {"train": self.state, "method": self.method, "loader": self.loader}

    def save_checkpoint(self) -> None:
        """Save the state after ``self.state.step`` steps (every rank calls this)."""
        index = self.data_index
        meta = run_meta(
            self.cfg, model_args=self.model_args, method=self.method, backend=self.dims.backend, index=index
        )
        meta["tokens_seen"] = self.state.tokens_seen
        tokenizer = Path(index.root) / index.tokenizer_file
        self.checkpointer.save(
            self.state.step,
            model=self.raw_model,
            optimizer=self.optimizer,
            parts=self._checkpoint_parts(),
            meta=meta,
            backend=self.backend,
            files={f"tokenizer/{index.tokenizer_file}": tokenizer} if tokenizer.is_file() else {},
        )
        self._last_saved_step = self.state.step

    def _checkpoint_bytes(self) -> int:
        """About how large one checkpoint of this run is: the one it resumed from, or the backend's estimate."""
        if self.resumed_from is not None:
            return sum(p.stat().st_size for p in self.resumed_from.rglob("*") if p.is_file())
        return self.backend.checkpoint_bytes(self.raw_model, self._trainable())

    def _load_checkpoint(self, path: Path) -> None:
        # The saved phase may train other parameters than the fresh one: put the model in it and build the
        # optimizer again (where the backend allows a new optimizer).
        rebuild = self.method.has_phases and self.backend.can_replace_optimizer

        def after_extra() -> None:
            if rebuild:
                self.method.apply_phase(self.raw_model)

        def optimizer_fn() -> Any:
            if rebuild:
                self._use_optimizer(self.method.build_optimizer(self.raw_model), replacing=True)
            return self.optimizer

        self.checkpointer.load(
            path,
            model=self.raw_model,
            optimizer_fn=optimizer_fn,
            parts=self._checkpoint_parts(),
            backend=self.backend,
            after_extra=after_extra,
            added_keys={"train": TrainState.ADDED_KEYS},
        )
        self._last_saved_step = self.state.step

    # -- the non-finite guard (megatron_pept.guard) ---------------------------------------------------------

    @property
    def bad_steps_in_a_row(self) -> int:
        return self.state.bad_steps_in_a_row

    def _rollback(self) -> None:
        """Reload the newest checkpoint and continue with the data after the bad batches."""
        path = self.checkpointer.newest_own(checksums=self.cfg.checkpoint.verify_checksums)
        if path is None:
            raise guard.no_rollback_target(self.cfg, bad_steps=self.bad_steps_in_a_row)
        counters = guard.plan_rollback(self.cfg.guard, self.state, target=path.path, target_step=path.step)
        logger.warning(
            "%d non-finite steps in a row at step %d: rolling back to %s and skipping the batches since",
            self.bad_steps_in_a_row,
            self.state.step,
            path.path,
        )
        data_position = self.loader.state_dict()
        self._load_checkpoint(path.path)
        self.loader.load_state_dict(data_position)
        for name, value in counters.items():  # the run's own counters, not the older ones of the checkpoint
            setattr(self.state, name, value)
        self.writer.scalars(self.state.step, {"guard/rollbacks": float(self.state.rollbacks)})

    def _save_unless_bad(self, why: str) -> None:
        """Save now, unless the guard has marked the state bad (a streak of non-finite steps): then the newest
        checkpoint, from before the streak, stays the one to resume from."""
        if self.state.bad_steps_in_a_row == 0:
            self.save_checkpoint()
            return
        logger.warning(
            "not saving at %s (step %d): the last %d steps were non-finite; resume from the newest checkpoint",
            why,
            self.state.step,
            self.state.bad_steps_in_a_row,
        )

    # -- one step ---------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def _stale_clip_coef(self) -> float:
        """Per-layer clipping: the coefficient global clipping would use, from the previous step's norm."""
        max_norm, last = self.cfg.train.max_grad_norm, self.state.last_grad_norm
        if max_norm <= 0 or last < 0:
            return 1.0
        return min(1.0, max_norm / (last + 1e-6))

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches: (loss, grad_norm, lr)."""
        step = self.state.step
        lr = self.cfg.optim.lr * self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum_steps):
            inputs, targets = self.loader.next_batch()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            last = micro == self.grad_accum_steps - 1
            if last:  # an optimizer that steps in backward (per-layer) does so in this one
                optimizer_protocol(self.optimizer).arm(clip_coef=self._stale_clip_coef())
            with self._autocast():
                loss = cross_entropy_loss(self.model(inputs), targets)
            loss_sum += self.backend.backward(loss, last=last)
        loss_mean = comm.all_reduce_mean(loss_sum).item()
        judged = guard.StepJudge(self.cfg.guard, self.state, loss=loss_mean)
        grad_norm, ok = self.backend.step(
            self.optimizer, self._trainable(), max_norm=self.cfg.train.max_grad_norm, accept=judged
        )
        # A skipped update (or one applied in backward, or by DeepSpeed) is counted, and rolled back in a streak.
        self.writer.scalars(step + 1, judged.count(step=step, grad_norm=grad_norm))
        if ok or not self.cfg.guard.enabled:
            self.state.last_grad_norm = grad_norm
        end = self.method.on_step_end(step=step, model=self.raw_model, optimizer=self.optimizer)
        if end.optimizer is not None:
            self._use_optimizer(end.optimizer, replacing=True)
            guard.forget_window(self.state)  # other parameters train now: their gradient norm has another scale
        if end.scalars:
            self.writer.scalars(step + 1, end.scalars)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return loss_mean, grad_norm, lr

    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (the same set on any number of ranks)."""
        return validation_loss(self.model, self.val_batches, device=self.device, autocast=self._autocast)

    def _log_eval(self, step: int, result: TrainResult) -> None:
        val_loss = self.evaluate()
        if math.isnan(val_loss):
            return
        result.val_losses[step] = val_loss
        ppl = math.exp(min(val_loss, 50.0))
        self.writer.scalars(step, {"val/loss": val_loss, "val/ppl": ppl})
        logger.info("step %d | val_loss %.4f | val_ppl %.2f", step, val_loss, ppl)

    # -- the loop ---------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg.train
        result = TrainResult()
        if cfg.eval_at_start and self.state.step == 0:
            self._log_eval(0, result)
        self.model.train()
        result.resumed_from = str(self.resumed_from) if self.resumed_from else None
        ckpt = self.cfg.checkpoint
        self.timer.start(self.state.step)
        device = self.dims.mesh.device_type if self.dims.mesh is not None else "cpu"
        with StopSignals(enabled=ckpt.save_on_signal, device=device) as signals, self._profiler() as self.profiler:
            while self.state.step < cfg.steps:
                self._train_one(result, signals)
                if result.interrupted:
                    break
            if ckpt.interval > 0 and self._last_saved_step != self.state.step and not result.interrupted:
                self._save_unless_bad("the end of the run")  # so a finished run can be exported or extended
            self.checkpointer.finish_pending()
        self.writer.close()
        if self.writer.error:
            self._stop_on_metrics_error()
        result.steps = self.state.step
        result.tokens_seen = self.state.tokens_seen
        result.skipped_steps = self.state.skipped_steps
        result.rollbacks = self.state.rollbacks
        result.spikes = self.state.spikes
        logger.info(
            "%s: %d steps, %d tokens", "stopped" if result.interrupted else "done", result.steps, result.tokens_seen
        )
        return result

    def _profiler(self) -> StepProfiler:
        """torch.profiler over train.profile_steps on rank 0 (megatron_pept.metrics.profile)."""
        steps = self.cfg.train.profile_steps
        return StepProfiler(
            profile_range(steps) if steps else None,
            folder=Path(self.cfg.run_dir) / PROFILE_FOLDER,
            device=self.device,
            rank=self.dims.rank,
        )

    def _train_one(self, result: TrainResult, signals: StopSignals) -> None:
        """One step with its logging, validation, guard, checkpoint and stop-signal handling."""
        cfg, ckpt = self.cfg.train, self.cfg.checkpoint
        self.profiler.step_starts(self.state.step + 1)
        loss, grad_norm, lr = self.train_step()
        step = self.state.step
        self.profiler.step_ended(step)
        result.train_losses.append(loss)
        rates = self.timer.step_ended(step, total_steps=cfg.steps)
        logging_step = step % cfg.log_interval == 0 or step == cfg.steps
        log_step(
            self.writer,
            step=step,
            total_steps=cfg.steps,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            rates=rates,
            mem_gb=peak_memory_gb(self.device),
            memory=device_memory_gb(self.device),
            console=logging_step,
        )
        if logging_step:  # the method's statistics kept as device tensors are read here, not in every step
            self.writer.sync()
        fault_point("step.end", step=step, rank=self.dims.rank)
        if not math.isfinite(loss) and not self.cfg.guard.enabled:
            raise FloatingPointError(
                f"loss became {loss} at step {step}; lower optim.lr or enable clipping (train.max_grad_norm)"
            )
        if guard.rollback_due(self.cfg.guard, self.state):
            self._rollback()
            return
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.steps:
            self._log_eval(step, result)
        if ckpt.interval > 0 and step % ckpt.interval == 0 and self.bad_steps_in_a_row == 0:
            self.save_checkpoint()
        if signals.requested():
            logger.warning("stop signal received at step %d: saving a checkpoint and exiting", step)
            if self._last_saved_step != step:
                self._save_unless_bad("the stop signal")
            result.interrupted = True
        if self.writer.error:
            self._stop_on_metrics_error()

    def _stop_on_metrics_error(self) -> None:
        """TensorBoard could not write (a full disk): save if checkpoints are on (their folder may be on another
        disk; on the same one the save fails cleanly itself), then stop with one line."""
        if self.cfg.checkpoint.interval > 0 and self._last_saved_step != self.state.step:
            self._save_unless_bad("a failed TensorBoard write")
        saved = "none" if self._last_saved_step is None else f"step {self._last_saved_step}"
        raise UserError(
            f"cannot write TensorBoard events in {self.writer.run_dir} at step {self.state.step} ({self.writer.error}"
            f"); newest checkpoint: {saved}; free space (or set metrics.tensorboard=false), then resume"
        )
