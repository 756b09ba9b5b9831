"""Full-rank training: every parameter trains with AdamW (fp32 or bf16 moments)."""

from __future__ import annotations

import warnings

from megatron_pept.config import MethodConfig, OptimConfig
from megatron_pept.methods.base import Method


class FullRank(Method):
    name = "full"

    def __init__(self, cfg: MethodConfig, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> None:
        super().__init__(cfg, optim_cfg=optim_cfg, total_steps=total_steps, seed=seed)
        if cfg.base_dtype != MethodConfig.base_dtype:
            warnings.warn(
                f"method.base_dtype={cfg.base_dtype} is ignored by method.name=full (it has no frozen base weights)",
                stacklevel=2,
            )
