"""The trainer: builds the parts from a :class:`Config`, owns the train state and runs the loop."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from megatron_pept.checkpoint import Checkpointer, checkpoint_root, lock_run_folders
from megatron_pept.config import Config, save_config, to_dict
from megatron_pept.data.builtin import ensure_builtin_dataset
from megatron_pept.data.loader import DistributedBatchLoader, WindowDataset, fixed_batches
from megatron_pept.data.shards import DataIndex, VerifiedShards, read_index
from megatron_pept.distributed import (
    ParallelDims,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    deepspeed_backend,
    grad_all_reduce_mean,
    init_parallel,
    parallelize,
    resolve_device,
)
from megatron_pept.errors import ConfigError, DataError, UserError
from megatron_pept.faults import fault_point
from megatron_pept.methods import build_method
from megatron_pept.metrics import (
    MetricsWriter,
    console_line,
    peak_memory_gb,
    peak_tflops,
    setup_console_logging,
)
from megatron_pept.models import build_model, llama_args
from megatron_pept.optim import build_schedule
from megatron_pept.optim.per_layer import PerLayerOptimizer

logger = logging.getLogger("megatron_pept")


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0
    tokens_seen: int = 0
    last_grad_norm: float = -1.0  # of the previous step; per-layer clipping uses it (-1: none yet)
    skipped_steps: int = 0  # updates skipped by the non-finite guard, over the whole run
    rollbacks: int = 0  # reloads of the last checkpoint after guard.rollback_after bad steps in a row
    bad_steps_in_a_row: int = 0  # the current streak of non-finite steps (no checkpoint is saved during one)
    rollback_target: int = -1  # the step of the checkpoint the last rollback went back to
    rollbacks_to_target: int = 0  # rollbacks in a row to that same checkpoint (capped by guard.max_rollbacks)

    GUARD_FIELDS = ("skipped_steps", "rollbacks", "bad_steps_in_a_row", "rollback_target", "rollbacks_to_target")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(self.step),
            "tokens_seen": torch.tensor(self.tokens_seen),
            "last_grad_norm": torch.tensor(self.last_grad_norm, dtype=torch.float64),
            **{name: torch.tensor(getattr(self, name)) for name in self.GUARD_FIELDS},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.last_grad_norm = float(state["last_grad_norm"])
        for name in self.GUARD_FIELDS:  # checkpoints of earlier versions lack some: keep the defaults
            if name in state:
                setattr(self, name, int(state[name]))

    def guard_counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.GUARD_FIELDS}


@dataclass
class TrainResult:
    """What a finished run reports back (also useful to tests)."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    tokens_seen: int = 0
    resumed_from: str | None = None
    interrupted: bool = False  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint
    skipped_steps: int = 0
    rollbacks: int = 0


def cross_entropy_loss(logits_bsv: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits_bsv.flatten(0, 1).float(), targets_bs.flatten(0, 1))


class Trainer:
    """Builds a run from its config and trains it. It holds the run's folders locked from the start (one run per
    run_dir, see :mod:`megatron_pept.checkpoint.lock`) until :meth:`close` or the end of the process; a run refused
    while being built (bad data, a mismatched checkpoint ...) leaves its folders as it found them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dims: ParallelDims = init_parallel(cfg.parallel, train=cfg.train)
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

    def _build(self) -> None:
        cfg = self.cfg
        t, d = cfg.train, cfg.data
        self.device = resolve_device(t, local_rank=self.dims.local_rank)
        self.compute_dtype = (
            torch.bfloat16
            if (t.dtype == "bf16" or (t.dtype == "auto" and self.device.type == "cuda"))
            else torch.float32
        )
        torch.manual_seed(t.seed)

        global_micro = t.micro_batch_size * self.dims.dp_world_size
        if t.global_batch_size % global_micro:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x {self.dims.dp_world_size} data-parallel ranks; "
                f"use a multiple of {global_micro}"
            )
        self.grad_accum_steps = t.global_batch_size // global_micro

        # Data.
        self.train_data, self.val_data, index = self._build_data()
        self.data_index = index
        self.loader = DistributedBatchLoader(
            [ds for ds, _ in self.train_data],
            weights=[w for _, w in self.train_data],
            micro_batch_size=t.micro_batch_size,
            seed=t.seed,
            dp_rank=self.dims.dp_rank,
            dp_world_size=self.dims.dp_world_size,
            allow_reshard=d.allow_reshard,
        )
        self.val_batches = (
            fixed_batches(
                self.val_data,
                micro_batch_size=t.micro_batch_size,
                num_batches=t.eval_batches,
                dp_rank=self.dims.dp_rank,
                dp_world_size=self.dims.dp_world_size,
            )
            if self.val_data is not None
            else []
        )
        data_path = index.root

        # Model: meta -> method conversion -> parallelise -> materialise -> initialise.
        self.model_args = llama_args(cfg.model, vocab_size=index.vocab_size, max_seq_len=d.seq_len)
        if self.model_args.vocab_size < index.vocab_size:
            raise DataError(
                f"model.vocab_size={self.model_args.vocab_size} is smaller than the data's tokenizer vocabulary "
                f"({index.vocab_size} ids, {data_path}); set model.vocab_size >= {index.vocab_size} or null"
            )
        self.method = build_method(cfg.method, optim_cfg=cfg.optim, total_steps=t.steps, seed=t.seed)
        model = build_model(self.model_args)
        self.method.convert(model)
        # Every rank initialises the full model from the same seed, so the weights do not depend on the layout.
        model.to_empty(device=self.device)
        init_gen = torch.Generator(device=self.device).manual_seed(t.seed)
        model.init_weights(generator=init_gen)
        self.method.after_init(model)
        model.model.activation_checkpointing = t.activation_checkpointing
        if t.compile:
            for layer in model.model.layers.values():
                layer.compile()
        self.raw_model = model  # what methods, optimizers and checkpoints see (sharded in place by FSDP2)
        self.model = parallelize(model, self.dims, device=self.device, per_layer=cfg.optim.per_layer)

        self.optimizer = self._per_layer(self.method.build_optimizer(model))
        self.engine = None
        if self.dims.backend == "deepspeed":
            ds_config = deepspeed_backend.deepspeed_config(
                cfg,
                grad_accum_steps=self.grad_accum_steps,
                world_size=self.dims.world_size,
                cuda=self.device.type == "cuda",
            )
            self.engine = deepspeed_backend.initialize(model, self.optimizer, ds_config)
            self.model = self.engine
            if hasattr(self.optimizer, "attach_zero"):  # matrix-aware optimizers work on ZeRO's fragments
                self.optimizer.attach_zero(deepspeed_backend.zero_layout(self.engine.optimizer))
            self.method.set_param_access(model, deepspeed_backend.DeepSpeedAccess(self.engine.optimizer))
        self.schedule = self.method.lr_schedule(build_schedule(cfg.optim, total_steps=t.steps))
        self.state = TrainState()
        self.tokens_per_step = t.global_batch_size * d.seq_len
        self.flops_per_token = self.model_args.flops_per_token(d.seq_len)
        self.peak_flops = peak_tflops(self.device, override=cfg.metrics.peak_tflops) * 1e12
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
            self._check_same_tokenizer(self.resumed_from)
            self._load_checkpoint(self.resumed_from)
        self.checkpointer.preflight(run_dir=Path(cfg.run_dir), checkpoint_bytes=self._checkpoint_bytes())
        # The run is accepted (config, data, model and checkpoint agree): only now does it write into run_dir, so a
        # refused run leaves run_dir as it found it.
        self.writer = MetricsWriter(cfg.run_dir, enabled=cfg.metrics.tensorboard and self.dims.is_main)
        if self.dims.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
            self.verified_shards.save()
        trainable = sum(p.numel() for _, p in self.method.trainable_parameters(model))
        total = sum(p.numel() for p in model.parameters())
        logger.info(
            "model %s: %.2fM parameters (%.2fM trainable), method %s, %s on %s, %d micro-batches of %d x %d tokens "
            "per step (%d tokens), %d train windows",
            cfg.model.name,
            total / 1e6,
            trainable / 1e6,
            self.method.name,
            str(self.compute_dtype).removeprefix("torch."),
            self.device,
            self.grad_accum_steps,
            t.micro_batch_size,
            d.seq_len,
            self.tokens_per_step,
            sum(ds.num_windows for ds, _ in self.train_data),
        )

    def _build_data(self) -> tuple[list[tuple[WindowDataset, float]], WindowDataset | None, DataIndex]:
        """Train datasets with their blend weights, the validation split, and the primary index."""
        d, run_dir = self.cfg.data, Path(self.cfg.run_dir)
        primary = Path(d.path) if d.path else (Path(d.blend[0].path) if d.blend else run_dir / "data")
        if d.builtin is not None and self.dims.is_main:
            ensure_builtin_dataset(d.builtin, primary)
        barrier(self.dims)
        cache = self.verified_shards = VerifiedShards(run_dir / ".verified_shards.json")  # saved once accepted
        checksums = d.verify_checksums and self.dims.is_main  # one rank hashes (shared storage); all check sizes
        sources = [(Path(s.path), s.weight) for s in d.blend] or [(primary, 1.0)]
        train = []
        for path, weight in sources:
            index = read_index(path)
            ds = WindowDataset(index, split="train", seq_len=d.seq_len, verify_checksums=checksums, verify_cache=cache)
            train.append((ds, weight))
        primary_index = read_index(primary)
        for ds, _ in train:
            if ds.index.tokenizer_sha256 != primary_index.tokenizer_sha256:
                raise DataError(
                    f"{ds.index.root} and {primary} were tokenized with different tokenizers; blend and validate "
                    "on data prepared with one tokenizer"
                )
        val = None
        if "val" in primary_index.splits and primary_index.splits["val"].tokens > 0:
            val = WindowDataset(
                primary_index,
                split="val",
                seq_len=d.seq_len,
                verify_checksums=checksums,
                verify_cache=cache,
            )
        else:
            logger.warning("%s has no validation split: val/loss will not be logged", primary)
        return train, val, primary_index

    # ------------------------------------------------------------------------------------------------------

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _checkpoint_parts(self) -> dict:
        return {"train": self.state, "method": self.method, "loader": self.loader}

    def save_checkpoint(self) -> None:
        """Save the state after ``self.state.step`` steps (every rank calls this)."""
        method_state = self.method.state_dict()
        meta = {
            "tokens_seen": self.state.tokens_seen,
            "method": self.method.name,
            "phase": int(method_state["phase"]) if "phase" in method_state else None,
            "backend": self.dims.backend,
            "model": self.cfg.model.name,
            "total_steps": self.cfg.train.steps,
            "model_args": dataclasses.asdict(self.model_args),
            "config": to_dict(self.cfg),
            "tokenizer": {
                "eos_id": self.data_index.eos_id,
                "bos_id": self.data_index.bos_id,
                "sha256": self.data_index.tokenizer_sha256,
            },
        }
        tokenizer = Path(self.data_index.root) / "tokenizer.model"
        self.checkpointer.save(
            self.state.step,
            model=self.raw_model,
            optimizer=self.optimizer,
            parts=self._checkpoint_parts(),
            meta=meta,
            engine=self.engine,
            files={"tokenizer/tokenizer.model": tokenizer} if tokenizer.is_file() else {},
        )
        self._last_saved_step = self.state.step

    def _checkpoint_bytes(self) -> int:
        """About how large one checkpoint of this run is: the one it resumed from, or the model's tensors plus two
        fp32 moments per trainable parameter (Adam's; the GaLore family and 8-bit states need less) and, under
        DeepSpeed, its fp32 master weights."""
        if self.resumed_from is not None:
            return sum(p.stat().st_size for p in self.resumed_from.rglob("*") if p.is_file())
        tensors = [*self.raw_model.parameters(), *self.raw_model.buffers()]
        model = sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors)  # global sizes
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self._trainable())
        return model + trainable * 4 * (3 if self.engine is not None else 2) + (1 << 20)

    def _check_same_tokenizer(self, path: Path) -> None:
        """Resuming on data made with another tokenizer would train on ids that mean other things (and an export
        would ship the new tokenizer with the old weights): refused unless data.allow_tokenizer_change."""
        from megatron_pept.checkpoint.export import read_meta

        saved = read_meta(path).get("tokenizer", {}).get("sha256")
        current = self.data_index.tokenizer_sha256
        if saved == current:
            return
        if saved is None:
            logger.warning("%s does not record its tokenizer (an earlier version): the data cannot be checked", path)
            return
        if not self.cfg.data.allow_tokenizer_change:
            raise DataError(
                f"{path} was trained on data made with tokenizer {saved[:12]}, but {self.data_index.root} was made "
                f"with {current[:12]}: resume on data made with the run's tokenizer (a copy is in "
                f"{path / 'tokenizer'}), or set data.allow_tokenizer_change=true to switch on purpose"
            )
        logger.warning(
            "data.allow_tokenizer_change: resuming %s (tokenizer %s) on data made with tokenizer %s",
            path,
            saved[:12],
            current[:12],
        )

    def _load_checkpoint(self, path: Path) -> None:
        def after_extra() -> None:
            apply_phase = getattr(self.method, "apply_phase", None)
            if apply_phase is not None and self.engine is None:
                apply_phase(self.raw_model)

        def optimizer_fn():
            if self.engine is None and getattr(self.method, "apply_phase", None) is not None:
                # The saved phase may train other parameters than the fresh one: build the optimizer again.
                if isinstance(self.optimizer, PerLayerOptimizer):
                    self.optimizer.remove_hooks()
                self.optimizer = self._per_layer(self.method.build_optimizer(self.raw_model))
                if self.dims.backend == "ddp" and not self.cfg.optim.per_layer:
                    self.model = parallelize(self.raw_model, self.dims, device=self.device)
            return self.optimizer

        self.checkpointer.load(
            path,
            model=self.raw_model,
            optimizer_fn=optimizer_fn,
            parts=self._checkpoint_parts(),
            after_extra=after_extra,
            engine=self.engine,
        )
        self._last_saved_step = self.state.step

    @property
    def bad_steps_in_a_row(self) -> int:
        return self.state.bad_steps_in_a_row

    def _rollback(self) -> None:
        """Reload the newest checkpoint and continue with the data after the bad batches; stop once the run has gone
        back to the same checkpoint more than guard.max_rollbacks times (it makes no progress)."""
        from megatron_pept.checkpoint import newest_complete

        bad, step = self.state.bad_steps_in_a_row, self.state.step
        path = newest_complete(self.checkpointer.root, checksums=self.cfg.checkpoint.verify_checksums)
        if path is None:
            raise UserError(
                f"{bad} steps in a row had a non-finite loss or gradient norm and there is no "
                "checkpoint to roll back to; set checkpoint.interval, lower optim.lr or check the data"
            )
        counters = self.state.guard_counters()
        again = counters["rollback_target"] == path.step
        counters["rollbacks_to_target"] = counters["rollbacks_to_target"] + 1 if again else 1
        if counters["rollbacks_to_target"] > self.cfg.guard.max_rollbacks:
            raise FloatingPointError(
                f"{bad} non-finite steps in a row at step {step} after {counters['rollbacks_to_target'] - 1} "
                f"rollbacks to {path.path.name}, the last good checkpoint ({path.path}); stopping: lower optim.lr, "
                "check the data after that step, or raise guard.max_rollbacks"
            )
        data_position = self.loader.state_dict()
        logger.warning(
            "%d non-finite steps in a row at step %d: rolling back to %s and skipping the batches since",
            bad,
            step,
            path.path,
        )
        self._load_checkpoint(path.path)
        self.loader.load_state_dict(data_position)
        for name, value in counters.items():  # the run's own counters, not the older ones of the checkpoint
            setattr(self.state, name, value)
        self.state.rollbacks += 1
        self.state.rollback_target = path.step
        self.state.bad_steps_in_a_row = 0

    def _guard(self, loss: float, grad_norm: float) -> bool:
        """True when the step's loss and gradient norm are finite (the update may proceed)."""
        if not self.cfg.guard.enabled:
            return True
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.method.trainable_parameters(self.raw_model)]

    def _per_layer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | PerLayerOptimizer:
        if not self.cfg.optim.per_layer:
            return optimizer
        return PerLayerOptimizer(optimizer, grad_reduce=grad_all_reduce_mean(self.dims))

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the data-parallel gradient reduction on all but the last micro-batch of a step."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if enabled else self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def _stale_clip_coef(self) -> float:
        max_norm, last = self.cfg.train.max_grad_norm, self.state.last_grad_norm
        if max_norm <= 0 or last < 0:
            return 1.0
        return min(1.0, max_norm / (last + 1e-6))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (the same set on any number of ranks: each rank sums the
        per-window losses of its share, weighted to skip padding, and the sums are added over the ranks)."""
        if not self.val_batches:
            return float("nan")
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # weighted loss, windows
        for inputs, targets, weights in self.val_batches:
            inputs, targets, weights = inputs.to(self.device), targets.to(self.device), weights.to(self.device)
            with self._autocast():
                logits = self.model(inputs)
            per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), reduction="none")
            per_window = per_token.view(targets.shape).mean(dim=1)
            sums += torch.stack([(per_window * weights).sum(), weights.sum()]).double()
        self.model.train()
        total, windows = all_reduce_sum(sums, self.dims).tolist()
        return total / windows

    def _log_eval(self, step: int, result: TrainResult) -> None:
        val_loss = self.evaluate()
        if math.isnan(val_loss):
            return
        result.val_losses[step] = val_loss
        ppl = math.exp(min(val_loss, 50.0))
        self.writer.scalars(step, {"val/loss": val_loss, "val/ppl": ppl})
        logger.info("step %d | val_loss %.4f | val_ppl %.2f", step, val_loss, ppl)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches: (loss, grad_norm, lr)."""
        step = self.state.step
        lr = self.cfg.optim.lr * self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.engine is not None:
            return self._deepspeed_step(step, lr)
        per_layer = isinstance(self.optimizer, PerLayerOptimizer)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum_steps):
            inputs, targets = self.loader.next_batch()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                loss = cross_entropy_loss(self.model(inputs), targets) / self.grad_accum_steps
            last = micro == self.grad_accum_steps - 1
            if per_layer and last:
                self.optimizer.arm(clip_coef=self._stale_clip_coef())  # step inside this backward
            with self._gradient_sync(last):
                loss.backward()
            loss_sum += loss.detach()
        loss_mean = all_reduce_mean(loss_sum, self.dims).item()
        if per_layer:  # the update happened inside backward: a bad step is counted (and rolled back), not skipped
            grad_norm = self.optimizer.disarm()
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            ok = self._guard(loss_mean, grad_norm.item())
        else:
            max_norm = self.cfg.train.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm if max_norm > 0 else float("inf"))
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            ok = self._guard(loss_mean, grad_norm.item())
            if ok:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_guard(ok, step, loss_mean, grad_norm.item())
        if ok or not self.cfg.guard.enabled:
            self.state.last_grad_norm = grad_norm.item()
        end = self.method.on_step_end(step=step, model=self.raw_model, optimizer=self.optimizer)
        if end.optimizer is not None:
            if per_layer:
                self.optimizer.remove_hooks()
            self.optimizer = self._per_layer(end.optimizer)
            if self.dims.backend == "ddp" and not per_layer:
                # DDP fixes the set of parameters it reduces when it wraps the model: wrap again.
                self.model = parallelize(self.raw_model, self.dims, device=self.device)
        if end.scalars:
            self.writer.scalars(step + 1, end.scalars)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return loss_mean, grad_norm.item(), lr

    def _count_guard(self, ok: bool, step: int, loss: float, grad_norm: float) -> None:
        if ok:
            self.state.bad_steps_in_a_row = 0
            return
        self.state.bad_steps_in_a_row += 1
        self.state.skipped_steps += 1
        logger.warning(
            "step %d: loss %s, gradient norm %s: update %s (%d in a row)",
            step + 1,
            loss,
            grad_norm,
            "skipped" if self.cfg.guard.enabled else "applied",
            self.bad_steps_in_a_row,
        )
        self.writer.scalars(step + 1, {"guard/skipped_steps": float(self.state.skipped_steps), "guard/nonfinite": 1.0})

    def _deepspeed_step(self, step: int, lr: float) -> tuple[float, float, float]:
        """The DeepSpeed engine scales the loss for accumulation, clips, and steps at the accumulation boundary."""
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum_steps):
            inputs, targets = self.loader.next_batch()
            with self._autocast():
                loss = cross_entropy_loss(self.engine(inputs.to(self.device)), targets.to(self.device))
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach() / self.grad_accum_steps
        grad_norm = self.engine.get_global_grad_norm()
        self.state.last_grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        loss_mean = all_reduce_mean(loss_sum, self.dims).item()
        # DeepSpeed has stepped already (bf16/fp32 have no overflow skip): a bad step is counted and rolled back.
        self._count_guard(self._guard(loss_mean, self.state.last_grad_norm), step, loss_mean, self.state.last_grad_norm)
        self._finish_step(step)
        return loss_mean, self.state.last_grad_norm, lr

    def _finish_step(self, step: int) -> None:
        end = self.method.on_step_end(step=step, model=self.raw_model, optimizer=self.optimizer)
        if end.scalars:
            self.writer.scalars(step + 1, end.scalars)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step

    def train(self) -> TrainResult:
        cfg = self.cfg.train
        result = TrainResult()
        if cfg.eval_at_start and self.state.step == 0:
            self._log_eval(0, result)
        self.model.train()
        result.resumed_from = str(self.resumed_from) if self.resumed_from else None
        start_step = self.state.step
        ckpt = self.cfg.checkpoint
        now = time.perf_counter()
        self._timing = {"since": now, "steps": 0, "interval_start": now}
        with _StopSignals(enabled=ckpt.save_on_signal) as signals:
            while self.state.step < cfg.steps:
                self._train_one(result, signals, start_step)
                if result.interrupted:
                    break
            if ckpt.interval > 0 and self._last_saved_step != self.state.step and not result.interrupted:
                self._save_unless_bad("the end of the run")  # so a finished run can be exported or extended
            self.checkpointer.finish_pending()
        self.writer.close()
        result.steps, result.tokens_seen = self.state.step, self.state.tokens_seen
        result.skipped_steps, result.rollbacks = self.state.skipped_steps, self.state.rollbacks
        logger.info(
            "%s: %d steps, %d tokens", "stopped" if result.interrupted else "done", result.steps, result.tokens_seen
        )
        return result

    def _train_one(self, result: TrainResult, signals: _StopSignals, start_step: int) -> None:
        """One step with its logging, validation, guard, checkpoint and stop-signal handling."""
        cfg, ckpt, timing = self.cfg.train, self.cfg.checkpoint, self._timing
        loss, grad_norm, lr = self.train_step()
        step = self.state.step
        result.train_losses.append(loss)
        self._sync()
        now = time.perf_counter()
        step_seconds = now - timing["interval_start"]
        timing["interval_start"] = now
        if step == start_step + 1:
            timing["since"], timing["steps"] = now, 0  # the first step pays for warm-up; keep it out of rates
        else:
            timing["steps"] += 1
        tokens_per_sec = self.tokens_per_step / max(step_seconds, 1e-9)
        mfu = tokens_per_sec * self.flops_per_token / self.peak_flops
        mem_gb = peak_memory_gb(self.device)
        self.writer.scalars(
            step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "perf/tokens_per_sec": tokens_per_sec,
                "perf/mfu": mfu,
                "mem/peak_gb": mem_gb,
            },
        )
        if step % cfg.log_interval == 0 or step == cfg.steps:
            mean_step = (now - timing["since"]) / timing["steps"] if timing["steps"] else step_seconds
            logger.info(
                console_line(
                    step=step,
                    total_steps=cfg.steps,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens_per_sec=self.tokens_per_step / max(mean_step, 1e-9),
                    mfu=self.tokens_per_step / max(mean_step, 1e-9) * self.flops_per_token / self.peak_flops,
                    mem_gb=mem_gb,
                    eta_seconds=mean_step * (cfg.steps - step),
                )
            )
        fault_point("step.end", step=step, rank=self.dims.rank)
        if not math.isfinite(loss) and not self.cfg.guard.enabled:
            raise FloatingPointError(
                f"loss became {loss} at step {step}; lower optim.lr or enable clipping (train.max_grad_norm)"
            )
        guard = self.cfg.guard
        if guard.enabled and guard.rollback_after and self.bad_steps_in_a_row >= guard.rollback_after:
            self._rollback()
            self.writer.scalars(self.state.step, {"guard/rollbacks": float(self.state.rollbacks)})
            return
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.steps:
            self._log_eval(step, result)
        if ckpt.interval > 0 and step % ckpt.interval == 0 and self.bad_steps_in_a_row == 0:
            self.save_checkpoint()
        if signals.requested(self.dims):
            logger.warning("stop signal received at step %d: saving a checkpoint and exiting", step)
            if self._last_saved_step != step:
                self._save_unless_bad("the stop signal")
            result.interrupted = True

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


class _StopSignals:
    """SIGTERM and SIGUSR1 (SLURM's pre-emption warning) ask the run to save and stop at the end of the step.

    The flag is reduced over the ranks each step, so all of them stop at the same step even if the signal
    reached only some. Handlers are installed only in the main thread and restored afterwards."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received = False
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True

    def requested(self, dims: ParallelDims) -> bool:
        if not self.enabled:
            return False
        flag = torch.tensor(1.0 if self.received else 0.0)
        if dims.distributed and torch.distributed.is_initialized():
            device = dims.mesh.device_type if dims.mesh is not None else "cpu"
            flag = flag.to(device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
