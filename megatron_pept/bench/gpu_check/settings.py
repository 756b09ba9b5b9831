"""What the GPU check runs: :class:`GpuCheckSettings` (shapes, steps and targets of every row group; the defaults
are the real check, :meth:`GpuCheckSettings.for_dry_run` the CPU one) and the row groups it knows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from megatron_pept.errors import ConfigError

CHECK_GROUPS = ("memory", "galore_8bit", "attention", "throughput")
"""Row groups, in the order they run (memory first, while nothing else holds device memory)."""


@dataclass(frozen=True)
class GpuCheckSettings:
    """Everything the check runs; the defaults are the real (GPU) check, :meth:`for_dry_run` the CPU one."""

    dry_run: bool = False
    device: str = "cuda"
    dtype: str = "bf16"
    data: str = "data/generated/quickstart"
    """Token shards the training runs read (the built-in quickstart data, made there when missing); relative to the
    current directory."""
    groups: tuple[str, ...] = CHECK_GROUPS
    threads: int | None = None
    """torch.set_num_threads for the run (the dry run uses 1: tiny ops on a shared CPU are fastest single-threaded,
    and LAPACK with two contended threads can take 1000x longer)."""
    vocab_size: int = 32000
    # throughput
    model: str = "1b"
    seq_len: int = 2048
    micro_batch: int = 8
    warmup_steps: int = 3
    timed_steps: int = 12
    backends: tuple[str, ...] = ("single", "fsdp2")
    galore_rank: int = 512
    galore_gap: int = 200
    galore_svd: str = "full"
    """Projector function whose refresh time is amortised over ``galore_gap`` (the method's default is full)."""
    relora_every: int = 5000
    """Steps between ReLoRA restarts the restart cost is amortised over (configs/relora_1b.yaml)."""
    mfu_target: float = 0.45
    galore_target: float = 0.95
    relora_target: float = 1.05
    # attention kernels
    attention_batch: int = 1
    attention_seq_len: int = 2048
    # galore_8bit
    bnb_model: str = "60m"
    bnb_rank: int = 128
    bnb_steps: int = 4
    bnb_batch: int = 4
    bnb_seq_len: int = 256
    bnb_min_cosine: float = 0.98
    bnb_max_norm_gap: float = 0.1
    # memory
    mem_model: str = "7b"
    mem_rank: int = 1024
    mem_batch: int = 1
    mem_seq_len: int = 256
    mem_steps: int = 2
    mem_activation_checkpointing: bool = True
    mem_target_gb: float = 22.0

    @classmethod
    def for_dry_run(cls, **overrides: Any) -> GpuCheckSettings:
        """The same check on CPU with tiny shapes (the ``debug`` model, a few steps), to test the plumbing."""
        tiny: dict[str, Any] = dict(
            dry_run=True,
            device="cpu",
            threads=1,
            vocab_size=1024,
            model="debug",
            seq_len=32,
            micro_batch=2,
            warmup_steps=1,
            timed_steps=2,
            galore_rank=16,
            attention_seq_len=32,
            bnb_model="debug",
            bnb_rank=64,  # 64 x 64 projected moments: the smallest that bitsandbytes' 8-bit path takes
            bnb_steps=3,
            bnb_batch=2,
            bnb_seq_len=32,
            mem_model="debug",
            mem_rank=16,
            mem_seq_len=32,
        )
        return cls(**{**tiny, **overrides})

    @property
    def relora_rank(self) -> int:
        from megatron_pept.models import MODEL_SHAPES

        return max(1, MODEL_SHAPES[self.model]["hidden_size"] // 16)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line, with the fix) for settings the check cannot run."""
        unknown = [g for g in self.groups if g not in CHECK_GROUPS]
        if unknown:
            raise ConfigError(f"unknown check group {', '.join(unknown)}; choose from {', '.join(CHECK_GROUPS)}")
        if self.warmup_steps < 1:
            raise ConfigError(f"--warmup must be at least 1 (the first step is never timed), got {self.warmup_steps}")
        if self.timed_steps < 2:
            raise ConfigError(f"--steps must be at least 2 (ReLoRA times one restart step), got {self.timed_steps}")
        if self.total_steps >= self.galore_gap:
            raise ConfigError(
                f"--warmup + --steps ({self.total_steps}) must stay below the GaLore gap {self.galore_gap}, so no "
                "timed step refreshes a projector"
            )
        for name, minimum in (("seq_len", 2), ("attention_seq_len", 2), ("mem_seq_len", 2), ("micro_batch", 1)):
            if getattr(self, name) < minimum:
                option = {"seq_len": "--seq-len", "attention_seq_len": "--seq-len", "micro_batch": "--micro-batch"}
                raise ConfigError(f"{option.get(name, name)} must be at least {minimum}, got {getattr(self, name)}")
        if self.galore_svd not in ("full", "randomized"):
            raise ConfigError(f"--galore-svd must be full or randomized, got {self.galore_svd!r}")


def with_overrides(s: GpuCheckSettings, **changes: Any) -> GpuCheckSettings:
    """``s`` with the given fields changed (None values are ignored: options the user did not give)."""
    return replace(s, **{k: v for k, v in changes.items() if v is not None})
