"""The method registry: ``method.name`` -> :class:`Method` subclass."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from megatron_pept.config import METHOD_NAMES, MethodConfig, OptimConfig
from megatron_pept.errors import ConfigError
from megatron_pept.methods.base import Method
from megatron_pept.methods.full import FullRank
from megatron_pept.methods.galore import GALORE_METHODS
from megatron_pept.methods.relora import LOWRANK_METHODS

METHODS: Mapping[str, type[Method]] = MappingProxyType(
    {cls.name: cls for cls in (FullRank, *LOWRANK_METHODS, *GALORE_METHODS)}
)


def build_method(cfg: MethodConfig, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> Method:
    if cfg.name not in METHODS:
        if cfg.name in METHOD_NAMES:
            raise ConfigError(
                f"method.name={cfg.name} is not available in this version; available: {', '.join(METHODS)}"
            )
        raise ConfigError(f"unknown method.name '{cfg.name}'; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg, optim_cfg=optim_cfg, total_steps=total_steps, seed=seed)


__all__ = ["METHODS", "Method", "build_method"]
