"""The method registry: ``method.name`` -> :class:`Method` subclass, the only list of method names, and the
``method.*`` keys their families' settings declare (:mod:`megatron_pept.registry` checks configs against them and
writes ``--help-config``). :func:`register_method` adds one (see docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from typing import Any

from megatron_pept.config import MethodConfig, OptimConfig, build_section
from megatron_pept.errors import ConfigError
from megatron_pept.methods.adam_mini import AdamMiniMethod
from megatron_pept.methods.base import Method, StepEnd
from megatron_pept.methods.full import FullRank
from megatron_pept.methods.galore import APOLLO_FIRA_METHODS, GALORE_METHODS
from megatron_pept.methods.muon import MUON_METHODS
from megatron_pept.methods.q_galore import QGaLore
from megatron_pept.methods.relora import LOWRANK_METHODS

logger = logging.getLogger("megatron_pept")

_ALL = (FullRank, *LOWRANK_METHODS, *GALORE_METHODS, AdamMiniMethod, *APOLLO_FIRA_METHODS, QGaLore, *MUON_METHODS)
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in _ALL}


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` selectable as ``method.name=<cls.name>`` (usable as a class decorator). Its ``config_keys``
    must be fields of its ``settings_class``; a key another registered family declares too must agree with it on
    type and default (``--help-config`` lists each key once)."""
    fields = {f.name for f in dataclasses.fields(cls.settings_class)}
    unknown = [k for k in cls.config_keys if k not in fields]
    if unknown:
        raise ValueError(f"method {cls.name!r} declares config keys its settings_class does not have: {unknown}")
    unread = [k for k in cls.resume_keys if k not in cls.config_keys]
    if unread:
        raise ValueError(f"method {cls.name!r} declares resume keys it does not read (config_keys): {unread}")
    for key, (tp, default) in _field_specs(cls.settings_class).items():
        known = method_keys().get(key)
        if known is not None and known != (tp, default):
            raise ValueError(f"method {cls.name!r} declares method.{key} with another type or default than {known}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method ``method.name=name`` selects; a ConfigError suggesting the closest name otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose one of {', '.join(METHODS)}"
        raise ConfigError(f"unknown method.name '{name}'{hint}")
    return METHODS[name]


def _field_specs(settings_class: type) -> dict[str, tuple[Any, Any]]:
    """Each field of a settings dataclass: (type, default)."""
    types = typing.get_type_hints(settings_class)
    defaults = settings_class()
    return {f.name: (types[f.name], getattr(defaults, f.name)) for f in dataclasses.fields(settings_class)}


def method_keys() -> dict[str, tuple[Any, Any]]:
    """Every ``method.*`` key a registered method's family declares, with its type and default, in the order of the
    registry (the families' field order)."""
    keys: dict[str, tuple[Any, Any]] = {}
    for cls in METHODS.values():
        for key, spec in _field_specs(cls.settings_class).items():
            keys.setdefault(key, spec)
    return keys


def _typed(key: str, value: Any) -> Any:
    """``value`` of ``method.<key>`` type-checked as the family that declares the key types it."""
    for cls in METHODS.values():
        if key in {f.name for f in dataclasses.fields(cls.settings_class)}:
            return dataclasses.asdict(build_section(cls.settings_class, {key: value}, "method."))[key]
    raise AssertionError(key)


def method_settings(cfg: MethodConfig) -> tuple[Any, dict[str, Any]]:
    """The chosen method's settings (its ``settings_class``, every given key type-checked, defaults filled in) and
    the keys given that it does not read (with values other than their defaults). An unknown key is one ConfigError
    with the closest known one."""
    cls = method_class(cfg.name)
    keys = method_keys()
    for key in cfg.options:
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
            hint = f"; did you mean 'method.{close[0]}'?" if close else " (run with --help-config to list every key)"
            raise ConfigError(f"unknown config key 'method.{key}'{hint}")
    own = {f.name for f in dataclasses.fields(cls.settings_class)}
    settings = build_section(cls.settings_class, {k: v for k, v in cfg.options.items() if k in own}, "method.")
    read = set(cls.config_keys)
    ignored = {}
    for key, value in cfg.options.items():
        if key not in read:
            typed = _typed(key, value)
            if typed != keys[key][1]:
                ignored[key] = typed
    return settings, ignored


def resolved_options(cls: type[Method], settings: Any, ignored: dict[str, Any]) -> dict[str, Any]:
    """The method section as a run records it: every key the method reads, resolved, then the given keys it
    ignores."""
    values = dataclasses.asdict(settings)
    return {**{key: values[key] for key in cls.config_keys}, **ignored}


def ignored_keys(cfg: MethodConfig) -> dict[str, object]:
    """``method.*`` keys set away from their default that the chosen method does not read, with their values."""
    return method_settings(cfg)[1]


def build_method(cfg: MethodConfig, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> Method:
    """The method ``cfg`` names, with its settings (a warning names the given keys it does not read)."""
    cls = method_class(cfg.name)
    settings, ignored = method_settings(cfg)
    if ignored:
        logger.warning(
            "method.name=%s does not read %s: %s",
            cfg.name,
            "this setting" if len(ignored) == 1 else "these settings",
            ", ".join(f"method.{k}={v!r}" for k, v in ignored.items()),
        )
    return cls(settings, optim_cfg=optim_cfg, total_steps=total_steps, seed=seed)


__all__ = [
    "METHODS",
    "Method",
    "StepEnd",
    "build_method",
    "ignored_keys",
    "method_class",
    "method_keys",
    "method_settings",
    "register_method",
    "resolved_options",
]
