"""The trainer: builds the parts from a :class:`Config`, owns the train state and runs the loop."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from megatron_pept.config import Config, save_config
from megatron_pept.data.builtin import ensure_builtin_dataset
from megatron_pept.data.loader import DistributedBatchLoader, WindowDataset, fixed_batches
from megatron_pept.data.shards import DataIndex, read_index
from megatron_pept.distributed import (
    ParallelDims,
    all_reduce_mean,
    barrier,
    deepspeed_backend,
    grad_all_reduce_mean,
    init_parallel,
    parallelize,
    resolve_device,
)
from megatron_pept.errors import ConfigError, DataError
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(self.step),
            "tokens_seen": torch.tensor(self.tokens_seen),
            "last_grad_norm": torch.tensor(self.last_grad_norm, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.last_grad_norm = float(state["last_grad_norm"])


@dataclass
class TrainResult:
    """What a finished run reports back (also useful to tests)."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    tokens_seen: int = 0


def cross_entropy_loss(logits_bsv: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits_bsv.flatten(0, 1).float(), targets_bs.flatten(0, 1))


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t, d = cfg.train, cfg.data
        self.dims: ParallelDims = init_parallel(cfg.parallel, train=t)
        setup_console_logging(is_main=self.dims.is_main)
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
        self.writer = MetricsWriter(cfg.run_dir, enabled=cfg.metrics.tensorboard and self.dims.is_main)

        if self.dims.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
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
        cache = run_dir / ".verified_shards.json"
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
        """Mean loss over the fixed validation batches."""
        if not self.val_batches:
            return float("nan")
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for inputs, targets in self.val_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                total += cross_entropy_loss(self.model(inputs), targets)
        self.model.train()
        return all_reduce_mean(total / len(self.val_batches), self.dims).item()

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
        if per_layer:
            grad_norm = self.optimizer.disarm()
        else:
            max_norm = self.cfg.train.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm if max_norm > 0 else float("inf"))
            self.optimizer.step()
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.zero_grad(set_to_none=True)
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
        return all_reduce_mean(loss_sum, self.dims).item(), self.state.last_grad_norm, lr

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
        self._finish_step(step)
        return all_reduce_mean(loss_sum, self.dims).item(), self.state.last_grad_norm, lr

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
        start_step = self.state.step
        timed_since = time.perf_counter()
        steps_timed = 0
        interval_start = time.perf_counter()
        for _ in range(start_step, cfg.steps):
            loss, grad_norm, lr = self.train_step()
            step = self.state.step
            result.train_losses.append(loss)
            self._sync()
            now = time.perf_counter()
            step_seconds = now - interval_start
            interval_start = now
            if step == start_step + 1:
                timed_since, steps_timed = now, 0  # the first step pays for warm-up; keep it out of rates
            else:
                steps_timed += 1
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
                mean_step = (now - timed_since) / steps_timed if steps_timed else step_seconds
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
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.steps:
                self._log_eval(step, result)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss} at step {step}; lower optim.lr or enable clipping (train.max_grad_norm)"
                )
        self.writer.close()
        result.steps, result.tokens_seen = self.state.step, self.state.tokens_seen
        logger.info("done: %d steps, %d tokens", result.steps, result.tokens_seen)
        return result
