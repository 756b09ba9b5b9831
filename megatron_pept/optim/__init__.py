"""Optimizers and learning-rate schedules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from megatron_pept.config import OptimConfig
from megatron_pept.optim.adamw import LowPrecisionAdamW, LowPrecisionWeightAdamW
from megatron_pept.optim.schedules import JaggedSchedule, Schedule, WarmupDecaySchedule
from megatron_pept.sharding import HOST_STATE_KEYS, keeps_on_host


def decay_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], *, weight_decay: float) -> list[dict]:
    """Two groups: matrices (embeddings and projections) decay, vectors (norm weights, biases) do not."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with fp32 moments (torch's) or bf16 moments (:class:`LowPrecisionAdamW`) over fp32 weights; over bf16
    weights (``train.param_dtype=bf16``) :class:`LowPrecisionWeightAdamW`, whose updates the trainer's
    ``optim.weight_update`` rounds in."""
    bf16_weights = any(p.dtype == torch.bfloat16 for g in param_groups for p in g["params"])
    if cfg.state_dtype == "fp32" and not bf16_weights:
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    cls = LowPrecisionWeightAdamW if bf16_weights else LowPrecisionAdamW
    return cls(
        param_groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        state_dtype=torch.float32 if cfg.state_dtype == "fp32" else torch.bfloat16,
    )


def build_schedule(cfg: OptimConfig, *, total_steps: int) -> Schedule:
    return WarmupDecaySchedule(
        kind=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_ratio=cfg.min_lr_ratio
    )


__all__ = [
    "HOST_STATE_KEYS",
    "JaggedSchedule",
    "LowPrecisionAdamW",
    "LowPrecisionWeightAdamW",
    "Schedule",
    "WarmupDecaySchedule",
    "build_adamw",
    "build_schedule",
    "decay_param_groups",
    "keeps_on_host",
]
