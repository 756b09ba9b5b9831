"""The method registry: ``method.name`` -> :class:`Method` subclass, the only list of method names (config
validation and ``--help-config`` read it). :func:`register_method` adds one (see docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import difflib
import logging

from megatron_pept.config import MethodConfig, OptimConfig
from megatron_pept.errors import ConfigError
from megatron_pept.methods.adam_mini import AdamMiniMethod
from megatron_pept.methods.base import Method, StepEnd
from megatron_pept.methods.full import FullRank
from megatron_pept.methods.galore import APOLLO_FIRA_METHODS, GALORE_METHODS
from megatron_pept.methods.relora import LOWRANK_METHODS

logger = logging.getLogger("megatron_pept")

_ALL = (FullRank, *LOWRANK_METHODS, *GALORE_METHODS, AdamMiniMethod, *APOLLO_FIRA_METHODS)
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in _ALL}


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` selectable as ``method.name=<cls.name>`` (usable as a class decorator). Its ``config_keys``
    must be fields of :class:`~megatron_pept.config.MethodConfig`."""
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    unknown = [k for k in cls.config_keys if k not in fields]
    if unknown:
        raise ValueError(f"method {cls.name!r} declares config keys MethodConfig does not have: {unknown}")
    unread = [k for k in cls.resume_keys if k not in cls.config_keys]
    if unread:
        raise ValueError(f"method {cls.name!r} declares resume keys it does not read (config_keys): {unread}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method ``method.name=name`` selects; a ConfigError suggesting the closest name otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose one of {', '.join(METHODS)}"
        raise ConfigError(f"unknown method.name '{name}'{hint}")
    return METHODS[name]


def ignored_keys(cfg: MethodConfig) -> dict[str, object]:
    """``method.*`` fields set away from their default that the chosen method does not read, with their values."""
    read = {"name", *method_class(cfg.name).config_keys}
    values, defaults = dataclasses.asdict(cfg), dataclasses.asdict(MethodConfig())
    return {key: value for key, value in values.items() if key not in read and value != defaults[key]}


def build_method(cfg: MethodConfig, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> Method:
    cls = method_class(cfg.name)
    ignored = ignored_keys(cfg)
    if ignored:
        logger.warning(
            "method.name=%s does not read %s: %s",
            cfg.name,
            "this setting" if len(ignored) == 1 else "these settings",
            ", ".join(f"method.{k}={v!r}" for k, v in ignored.items()),
        )
    return cls(cfg, optim_cfg=optim_cfg, total_steps=total_steps, seed=seed)


__all__ = ["METHODS", "Method", "StepEnd", "build_method", "ignored_keys", "method_class", "register_method"]
