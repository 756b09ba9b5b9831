"""The checks of a config that need the registries of methods and backends, above :mod:`megatron_pept.config`
(which imports no part of the stack), :mod:`megatron_pept.methods` and :mod:`megatron_pept.distributed`.

:func:`load_config` and :func:`config_from_dict` read a config completely: :mod:`megatron_pept.config`'s own
checks (schema, types, ranges of every other section; an unknown ``method.*`` key is refused there with the
closest known key, because the keys are passed in from here), then :func:`resolve`: the method exists, its
family's settings type-check and pass the method's ``validate``, the method runs under the backend, and the
backend can run what the method's traits say it does. The trainer resolves any config it is given, so a config
read by :func:`megatron_pept.config.load_config` alone is checked before anything runs too; then it calls
:func:`check_runtime`, the checks that depend on the machine (is CUDA there).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from megatron_pept import config as config_module
from megatron_pept.config import GPU_ATTENTION, Config, MethodConfig, attention_problem, describe_field, field_docs
from megatron_pept.distributed import backend_class, compute_dtype, resolve_device
from megatron_pept.errors import ConfigError
from megatron_pept.methods import METHODS, method_class, method_keys, method_settings, resolved_options
from megatron_pept.models.attention import import_attention_package


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """:func:`megatron_pept.config.load_config`, then :func:`resolve`."""
    return resolve(config_module.load_config(path, overrides, method_keys=method_keys()))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """:func:`megatron_pept.config.config_from_dict`, then :func:`resolve` (a checkpoint's saved config)."""
    return resolve(config_module.config_from_dict(raw, method_keys=method_keys()))


def resolve(cfg: Config) -> Config:
    """Check what needs the registries (see the module docstring) and record the method's settings as the run
    uses them (``cfg.method.options``: every key it reads, with its default where none was given). Returns
    ``cfg``; resolving a resolved config changes nothing."""
    cls = method_class(cfg.method.name)
    settings, ignored = method_settings(cfg.method)
    cls.validate(settings, cfg)
    if cls.backends is not None and cfg.parallel.backend not in cls.backends:
        raise ConfigError(
            f"method.name={cls.name} runs with parallel.backend={' or '.join(cls.backends)} in this version; got "
            f"parallel.backend={cfg.parallel.backend}"
        )
    traits = cls.traits(settings)
    if cfg.train.param_dtype == "bf16":
        changing = traits.changes_trainable_set or traits.base_dtype_changes
        if changing:
            raise ConfigError(
                f"train.param_dtype=bf16 cannot run with {changing} in this version: the phase switch makes new "
                "weights (an fp32 master becomes a frozen base, adapters appear) after the model's weights were "
                "set in bf16; start the low-rank phase from a bf16 run's weights (model.init_from) instead"
            )
    backend_class(cfg.parallel.backend).validate(cfg, traits)
    cfg.method = MethodConfig(cls.name, resolved_options(cls, settings, ignored))
    return cfg


def check_runtime(cfg: Config) -> None:
    """The checks that need this machine, made when a run starts, before it starts processes or writes anything:
    the device and compute dtype ``train.device`` and ``train.dtype`` resolve to here (``auto``: CUDA if visible)
    can run the attention kernel, whose package must import. (A saved config is not checked against the machine
    that reads it: an export on a CPU machine reads a run trained with flash attention.)"""
    device = resolve_device(cfg.train)  # train.device=cuda without a visible GPU is refused here too
    dtype = "bf16" if compute_dtype(cfg.train, device) == torch.bfloat16 else "fp32"
    attention = cfg.model.attention
    problem = attention_problem(attention, device=device.type, dtype=dtype, auto_device=cfg.train.device == "auto")
    if problem:
        raise ConfigError(problem)
    if attention in GPU_ATTENTION:
        import_attention_package(attention)


def describe_method_keys() -> str:
    """The ``method.*`` keys of ``--help-config``: each once, with its type and default, the documentation of each
    family that declares it (labelled by family when several do), and the methods that read it."""
    lines = []
    for key, (tp, default) in method_keys().items():
        docs: dict[str, str] = {}  # doc -> the family whose settings class wrote it
        for cls in METHODS.values():
            for owner in reversed(cls.settings_class.__mro__):
                if dataclasses.is_dataclass(owner) and key in field_docs(owner):
                    docs.setdefault(field_docs(owner)[key], owner.family)
        text = " ".join(f"{family}: {doc}" if len(docs) > 1 else doc for doc, family in docs.items())
        lines.append(describe_field(f"method.{key}", default, tp, text))
        users = [name for name, cls in METHODS.items() if key in cls.config_keys]
        lines.append(f"    used by: {', '.join(users) if users else 'no method'}")
    return "\n".join(lines)


def all_keys() -> list[str]:
    """Every dotted key a run understands: the config sections' and every registered method's."""
    return [*config_module.all_keys(), *(f"method.{key}" for key in method_keys())]


def describe_config() -> str:
    """The text of ``--help-config``: every key with its type, default and meaning."""
    return config_module.describe_config(method_section=describe_method_keys())
