"""Typed run configuration: dataclass schema, YAML loading, dotted command-line overrides, validation.

A run is described by one YAML file plus ``key.sub=value`` overrides. Every key is a field of the dataclasses
below, each documented by the string under it (``python -m megatron_pept.train --help-config`` prints them).
An unknown key or a wrongly typed value raises :class:`ConfigError` naming the key and the closest valid one.

YAML files may pull in others with a top-level ``include:`` (a path or a list of paths, relative to the file);
keys in the including file win over the included ones.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_pept.assets import missing_config_hint, resolve_config_path
from megatron_pept.errors import ConfigError

MODEL_SIZES = ("debug", "60m", "130m", "250m", "350m", "1b", "7b")


@dataclass
class ModelConfig:
    name: Literal["debug", "60m", "130m", "250m", "350m", "1b", "7b"] = "debug"
    """Named model size; `debug` is 2 layers of width 64, the others follow ReLoRA Table 1 and GaLore's 1B/7B."""
    vocab_size: int | None = None
    """Vocabulary size; null takes it from the data's index (the tokenizer it was made with)."""
    hidden_size: int | None = None
    """Override of the named size's hidden width (null keeps the named size's)."""
    num_layers: int | None = None
    """Override of the named size's number of transformer blocks."""
    num_heads: int | None = None
    """Override of the named size's number of query heads."""
    num_kv_heads: int | None = None
    """Override of the named size's number of key/value heads (grouped-query attention when < num_heads)."""
    intermediate_size: int | None = None
    """Override of the named size's SwiGLU hidden width."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    max_position_embeddings: int | None = None
    """The context an export declares (config.json's max_position_embeddings); training is unaffected (it uses
    data.seq_len). null: 2048, the context of LLaMA and of the papers' named sizes, or data.seq_len if larger."""
    norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output (LM head) projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; o_proj/down_proj use init_std / sqrt(2 * num_layers)."""
    attention: Literal["sdpa", "flash", "te"] = "sdpa"
    """Attention kernel: torch SDPA (default, CPU and GPU), flash-attn or transformer-engine (GPU extras)."""
    init_from: str | None = None
    """A Hugging Face LLaMA folder (config.json and safetensors) to start from instead of a random initialisation:
    continued pretraining, or ReLoRA/GaLore on top of a released model. Its config must match this model (a
    mismatch is refused with the overrides that would match); a resumed run loads its checkpoint instead."""


@dataclass
class DataSource:
    path: str = ""
    """Shard folder made by megatron-pept-prepare-data (tools/prepare_data.py in a checkout)."""
    weight: float = 1.0
    """Relative share of training samples drawn from this folder."""


@dataclass
class DataConfig:
    path: str = ""
    """Folder of token shards with an index.json (made by megatron-pept-prepare-data, tools/prepare_data.py in a
    checkout); its val split is validated on."""
    blend: list[DataSource] = field(default_factory=list)
    """Train on a weighted mixture instead of `path` alone: a list of {path, weight}; validation stays on `path`
    (or the first entry when `path` is empty)."""
    builtin: Literal["quickstart"] | None = None
    """If set and `path` holds no shards yet, generate the named built-in corpus there first (no download)."""
    seq_len: int = 256
    """Tokens per training sequence (the model sees windows of seq_len + 1 tokens: inputs and shifted targets)."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the index before training (remembered per run_dir, so once per run)."""
    allow_tokenizer_change: bool = False
    """Let a checkpoint resume on data made with another tokenizer than the one it was trained with (refused by
    default: the same ids would mean other tokens)."""
    allow_reshard: bool = False
    """Let a checkpoint resume on another data-parallel size or micro-batch: the global sample stream continues
    exactly, only the assignment of samples to ranks changes."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Number of optimizer steps."""
    global_batch_size: int = 32
    """Sequences per optimizer step, summed over data-parallel ranks and gradient-accumulation micro-batches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; the rest of the global batch is gradient accumulation."""
    seed: int = 0
    """Seed of initialisation, data order and every other random draw."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: bf16 autocast with fp32 master weights, or fp32. auto: bf16 on CUDA, fp32 on CPU (bf16
    with param_dtype=bf16)."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype the weights are held and trained in. fp32: fp32 masters (bf16 compute is autocast over them). bf16:
    every weight and its gradient in bf16 with no fp32 copy anywhere (2 bytes a weight instead of 4, and 2 more
    saved per gradient); each update is rounded into the weight by optim.weight_update. Runs on single, ddp,
    fsdp2 and deepspeed, with every method whose trainable set stays the same and every optimizer, per-layer updates
    included; computes in bf16 (train.dtype=auto or bf16), or in fp32 from each module's weights upcast for its
    forward (train.dtype=fp32: for CPUs without bf16 matmul; not under deepspeed)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to train on; auto picks CUDA when available."""
    compile: bool = False
    """Wrap each transformer block in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations during backward (non-reentrant torch.utils.checkpoint)
    instead of storing them: activation memory of about one block, for about a third more compute. Works with
    every backend, method and per-layer updates; results are unchanged."""
    log_interval: int = 10
    """Steps between console lines (TensorBoard gets every step). Method statistics kept on the device (GaLore, APOLLO,
    Fira, ReLoRA family) are read on the host once per interval, not in every step."""
    eval_interval: int = 100
    """Steps between validation passes; 0 disables periodic validation (the last step is still evaluated)."""
    eval_batches: int = 8
    """Size of the validation set in micro-batches: the first eval_batches x micro_batch_size windows of the val
    split, the same in every run and shared out among the data-parallel ranks (val/loss does not depend on them)."""
    eval_at_start: bool = True
    """Also evaluate before the first step, so the curve starts at the untrained loss."""
    profile_steps: str | None = None
    """Profile optimizer steps A to B (written A:B, e.g. 10:12; steps counted from 1 as on the console, both
    included) with torch.profiler on rank 0: CPU activity, and CUDA kernels on a GPU, with shapes and memory events.
    When step B ends, a trace in TensorBoard's profiler format (Chrome trace JSON) is written to run_dir/profile/
    (tensorboard --logdir RUN_DIR with torch-tb-profiler, or Perfetto). Start past the first steps, which pay for
    warm-up. null: no profiling."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear down to min_lr_ratio * lr, or constant."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not to norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1 and beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    state_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the Adam moments; bf16 halves optimizer memory (the Approximations paper's bf16 baseline). The GaLore
    family keeps its own (fp32, or 8-bit): ignored there, with a warning."""
    per_layer: bool = False
    """Step each parameter inside backward and free its gradient at once (per-layer weight updates)."""
    weight_update: Literal["auto", "stochastic", "kahan", "nearest"] = "auto"
    """How each step's update is rounded into weights held in bf16 (train.param_dtype=bf16): stochastic (unbiased
    stochastic rounding, its bits drawn from train.seed, the weight's name and its count of updates), kahan (Kahan
    summation: a bf16 compensation buffer per weight, 2 more bytes a weight), or nearest (plain rounding, for
    comparison: updates under half a bf16 step are lost). auto: stochastic. Ignored (one log line) with fp32
    weights."""


@dataclass(init=False)
class MethodConfig:
    """The ``method`` section: ``name`` and the chosen method's settings (``method.rank=4`` ...), kept here as they
    were given. Each method family declares its settings in a dataclass of its own (``Method.settings_class``, with
    their types, defaults, documentation and checks); :mod:`megatron_pept.registry` checks these options against
    it and fills in the defaults, so this module needs no method to read a config."""

    name: str = "full"
    """Training method: full, lora, relora, redora, repissa, reloqra, galore, galore_ef, galore_dynamic,
    galore_dynamic_ef, galore_8bit, galore_adafactor, adam_mini, apollo, apollo_mini, fira (the registry in
    megatron_pept.methods.METHODS; each key below says which methods read it)."""
    options: dict[str, Any]
    """The other ``method.*`` keys, by name (without the ``method.`` prefix)."""

    def __init__(self, name: str = "full", options: dict[str, Any] | None = None, **settings: Any) -> None:
        self.name = name
        self.options = {**(options or {}), **settings}

    def with_options(self, **settings: Any) -> MethodConfig:
        """A copy with ``settings`` set (or replaced)."""
        return MethodConfig(self.name, {**self.options, **settings})


@dataclass
class ParallelConfig:
    backend: str = "single"
    """How the model is spread over processes: single, ddp, fsdp2 or deepspeed (the registry in
    megatron_pept.distributed.BACKENDS)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (1, 2 or 3); used with backend=deepspeed."""
    deepspeed_config: str | None = None
    """JSON or YAML file merged over the DeepSpeed config generated from this one (offload, buckets, overlap ...);
    batch sizes, accumulation, clipping, optimizer and scheduler stay ours."""


@dataclass
class MetricsConfig:
    tensorboard: bool = True
    """Write TensorBoard event files into run_dir."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; null looks up known GPUs, or measures a matmul on CPU."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Steps between checkpoints; 0 saves none (a SIGTERM/SIGUSR1 still saves one before exiting)."""
    resume: str = "auto"
    """auto: resume from the newest complete checkpoint in checkpoint.dir, if any; none: start fresh (refused when
    checkpoints exist, so nothing is overwritten by accident); or the path of a checkpoint folder to resume from."""
    dir: str | None = None
    """Folder of the checkpoints; default run_dir/checkpoints."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted only after a newer one is complete."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none kept beyond keep_last)."""
    async_save: bool = False
    """Write checkpoints in the background (dcp.async_save on its own process group); the commit happens at the
    next save or the end of the run, so a crash before that loses only the newest checkpoint."""
    save_on_signal: bool = True
    """On SIGTERM or SIGUSR1 (SLURM pre-emption) finish the current step, save a checkpoint and exit cleanly."""
    verify_checksums: bool = True
    """Check every file's sha256 against the completion marker before resuming (size checks always run)."""


@dataclass
class GuardConfig:
    enabled: bool = True
    """Skip the update of a step whose loss or gradient norm is not finite (logged under guard/ and counted)."""
    rollback_after: int = 3
    """After this many non-finite steps since the last accepted update, reload the last checkpoint and go on with
    the data after the bad batches (0: never roll back). Needs checkpoint.interval > 0. Spikes (below) do not count:
    a skipped spike leaves the state as it was."""
    max_rollbacks: int = 3
    """Rollbacks to the same checkpoint (no newer one saved in between) before the run stops with an error naming
    the step and that checkpoint, the last good one (0: stop instead of the first rollback)."""
    spike_loss_sigma: float = 0.0
    """Loss-spike rule (0: off): skip the update of a step whose loss is above the mean of the last
    guard.spike_window accepted steps' losses by more than this many of their standard deviations (population std);
    counted in guard/spikes and guard/skipped_steps. Finite steps only; needs guard.enabled, and an update decided
    after backward (not optim.per_layer, not DeepSpeed). Try 6."""
    spike_grad_norm_ratio: float = 0.0
    """Gradient-norm spike rule (0: off): skip the update of a step whose gradient norm (before clipping) is more
    than this many times the median of the last guard.spike_window accepted steps' norms (the lower of the two
    middle values for an even window). Same conditions as guard.spike_loss_sigma. Try 10."""
    spike_window: int = 100
    """Accepted steps the spike rules compare against (a step skipped for any reason never enters it); also their
    warm-up (no step is judged a spike before the window is full) and the limit on spikes in a row, after which
    the run stops (the loss has moved to a new level). Emptied when the method switches optimizer (a warm start
    ends), whose parameters have gradients of another scale."""


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Where checkpoints, TensorBoard events and the resolved config.yaml go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


# ----------------------------------------------------------------------------------------------------------
# Schema introspection


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``optim.lr``."""
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        elif not (cls is MethodConfig and name == "options"):
            keys.append(f"{prefix}{name}")
    return keys


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a config dataclass (a copy: callers may change it)."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """:func:`field_docs`, read from the source once per class (``--help-config`` asks about each class many
    times, and parsing its module's source each time took seconds)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def describe_config(cls: type = Config, prefix: str = "", *, method_section: str = "") -> str:
    """Every key with its type, default and docstring: the text of ``--help-config``. The method settings come
    from the methods (``method_section``, written by :func:`megatron_pept.registry.describe_config`)."""
    lines: list[str] = []
    docs = field_docs(cls)
    defaults = cls()
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            lines.append(describe_config(tp, f"{prefix}{name}.", method_section=method_section))
            continue
        if cls is MethodConfig and name == "options":
            if method_section:
                lines.append(method_section)
            continue
        lines.append(describe_field(f"{prefix}{name}", getattr(defaults, name), tp, docs.get(name)))
    return "\n".join(lines)


def describe_field(key: str, default: Any, tp: Any, doc: str | None) -> str:
    """One key of ``--help-config``: ``key = default   [type]`` and its documentation."""
    lines = [f"{key} = {default!r}   [{type_name(tp)}]"]
    if doc:
        lines.append(textwrap.fill(doc, width=100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)


def type_name(tp: Any) -> str:
    """How ``--help-config`` and errors write a field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------------------------------------
# Conversion of raw (YAML / command-line) values into typed fields


def _closest(key: str, candidates: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if matches:
        return matches[0]
    # A misspelt section or leaf alone: compare the last component too.
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    matches = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[matches[0]] if matches else None


def _unknown_key_error(key: str, *, method_keys: Collection[str] = ()) -> ConfigError:
    suggestion = _closest(key, [*all_keys(), *(f"method.{k}" for k in method_keys)])
    hint = f"; did you mean '{suggestion}'?" if suggestion else " (run with --help-config to list every key)"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn ``value`` into type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str | int | float | bool):
            str_choices = [str(c) for c in choices]
            close = difflib.get_close_matches(str(value), str_choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{key}' must be one of {', '.join(str_choices)}; got {value!r}{hint}")
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config key '{key}' expects {type_name(tp)}; got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str):
            # Command-line form "0.9,0.95" or "[0.9, 0.95]".
            value = parse_yaml(value if value.strip().startswith("[") else f"[{value}]", source=f"config key '{key}'")
        if isinstance(value, int | float | bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' expects a list ({type_name(tp)}); got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values ({type_name(tp)}); got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        if _is_dataclass_type(item_tp):
            items = [_build(item_tp, v, f"{key}[{i}].") for i, v in enumerate(value)]
            return items
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}' expects true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"config key '{key}' expects an integer; got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML 1.1 reads "1e-3" as a string
        if number is None:
            raise ConfigError(f"config key '{key}' expects a number; got {value!r}")
        if not math.isfinite(number):  # inf and nan pass every range check below and fail only in training
            raise ConfigError(f"config key '{key}' expects a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string; got {value!r}")
    raise AssertionError(f"unsupported config field type {tp!r} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "", *, method_keys: Collection[str] = ()) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' is a section; give it a mapping, got {raw!r}")
    if cls is MethodConfig:
        return _build_method(raw, prefix, method_keys=method_keys)
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        tp = types_.get(name)
        if tp is None or (isinstance(value, dict) and not _is_dataclass_type(tp)):
            while isinstance(value, dict) and value:  # name the full key the user wrote
                child, value = next(iter(value.items()))
                key = f"{key}.{child}"
            raise _unknown_key_error(key)
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, value or {}, f"{key}.", method_keys=method_keys)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """The dataclass ``cls`` from the mapping ``raw`` (keys under ``prefix``, e.g. ``method.``), every value
    type-checked; an unknown key or a wrong type is one ConfigError naming the full key."""
    return _build(cls, raw, prefix)


def _build_method(raw: dict[str, Any], prefix: str, *, method_keys: Collection[str]) -> MethodConfig:
    """The method section: ``name`` type-checked here, every other key kept as given. With ``method_keys`` (every
    key some registered method reads), an unknown key is refused here, with the closest known key."""
    options = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name == "name":
            continue
        if isinstance(value, dict) or (method_keys and name not in method_keys):
            while isinstance(value, dict) and value:  # name the full key the user wrote
                child, value = next(iter(value.items()))
                key = f"{key}.{child}"
            raise _unknown_key_error(key, method_keys=method_keys)
        options[name] = value
    return MethodConfig(_coerce(raw.get("name", "full"), str, f"{prefix}name"), options)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


YAML_MAX_VALUES = 1_000_000
"""The most values (mappings, lists and scalars, counted with aliases expanded) one YAML document may hold: far
above any configuration, far below an alias bomb's billions."""


def _check_expanded_size(value: Any, *, source: str) -> None:
    """Refuse a document that expands to more than :data:`YAML_MAX_VALUES` values: a few lines of anchors and
    aliases can stand for billions of values, which any later formatting (an error message, the saved config.yaml)
    would try to write out."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > YAML_MAX_VALUES:
            raise ConfigError(
                f"{source} expands to more than {YAML_MAX_VALUES:,} values through its anchors and aliases (a YAML "
                "alias bomb?); write it out without them"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


_BASE_60 = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader without YAML 1.1's base-60 numbers (dropped in YAML 1.2): ``10:12`` is the text
    "10:12" (``train.profile_steps``), not the integer 612."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and _BASE_60.fullmatch(value):
            return yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG
        return super().resolve(kind, value, implicit)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` as configs are read (no base-60 numbers: :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain values only


def parse_yaml(text: str, *, source: str) -> Any:
    """``yaml.safe_load(text)`` with one-line errors naming ``source``: a syntax error (with its line), a tag that
    would build a Python object (``!!python/...``: safe_load refuses it), an alias bomb."""
    try:
        value = safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or ""
        if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
            tag = problem.split("for the tag", 1)[-1].strip(" '").replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(
                f"{source} uses the YAML tag {tag}{where}, which would build a Python object; only plain values, "
                "lists and mappings are read"
            ) from None
        raise ConfigError(f"{source} is not valid YAML{where}; fix the syntax there") from None
    _check_expanded_size(value, source=source)
    return value


def read_yaml_file(path: Path, *, what: str) -> Any:
    """A YAML (or JSON, which is YAML) file through :func:`parse_yaml`; unreadable or not UTF-8 is one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"{what} {path} cannot be read ({reason}); pass a readable YAML file") from None
    return parse_yaml(text, source=f"{what} {path}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    raw = read_yaml_file(path, what="config file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(raw).__name__}")
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, (*seen, path)))
    return _deep_merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], "1e-3" parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optim.lr=1e-3)")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; write it as key.sub=value")
    try:
        parsed = safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    _check_expanded_size(parsed, source=f"override '{key}'")
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = dict(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise _unknown_key_error(".".join(parts[: depth + 2]))
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], *, method_keys: Collection[str] = ()) -> Config:
    """A config from plain data (a parsed YAML file, a checkpoint's saved config), type-checked and validated as
    far as this module can: everything but the method's settings and the backend's conditions, which
    :func:`megatron_pept.registry.config_from_dict` checks too (``method_keys``: the keys methods read, so that an
    unknown one is refused with the closest known key)."""
    cfg = _build(Config, raw, method_keys=method_keys)
    validate(cfg)
    return cfg


def _config_file(path: str | os.PathLike[str]) -> Path:
    resolved = resolve_config_path(path)
    if not resolved.exists():
        raise ConfigError(f"config file {resolved.resolve()} does not exist{missing_config_hint(path)}")
    return resolved


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None, *, method_keys: Collection[str] = ()
) -> Config:
    """Read a YAML file (or only defaults when ``path`` is None), apply overrides, type-check and validate (see
    :func:`config_from_dict`; :func:`megatron_pept.registry.load_config` checks the method's settings too, and the
    trainer does so for any config it is given).

    ``path`` may also be the bare name of a shipped configuration (``quickstart``), found in the installed
    package (or the checkout's ``configs/``) when no file of that name is here."""
    raw = _read_yaml(_config_file(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, list(overrides or [])), method_keys=method_keys)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (the saved config.yaml, a checkpoint's meta.json): the method section as its
    keys are written, ``method.name`` and its settings side by side."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    out = plain(dataclasses.asdict(cfg))
    method = out["method"]
    out["method"] = {"name": method["name"], **method["options"]}
    return out


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# Semantic validation (types are already right here)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def profile_range(text: str) -> tuple[int, int]:
    """``train.profile_steps`` ("A:B") as the steps (A, B); a ConfigError with the form expected otherwise."""
    first, sep, last = text.partition(":")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()):
        raise ConfigError(
            f"train.profile_steps must be FIRST:LAST, two step numbers (e.g. 10:12: steps 10, 11 and 12); got {text!r}"
        )
    steps = int(first), int(last)
    _require(steps[0] >= 1, f"train.profile_steps={text}: steps count from 1; start at 1 or later")
    _require(steps[0] <= steps[1], f"train.profile_steps={text}: the first step is after the last; write FIRST:LAST")
    return steps


def spike_rule_on(g: GuardConfig) -> bool:
    """Whether a spike rule (loss or gradient norm) is asked for."""
    return g.spike_loss_sigma > 0 or g.spike_grad_norm_ratio > 0


GPU_ATTENTION = {"flash": "flash-attn", "te": "transformer-engine"}
"""The ``model.attention`` kernels that run only on CUDA and in bf16, with the package each needs."""


def attention_problem(attention: str, *, device: str, dtype: str, auto_device: bool = False) -> str | None:
    """Why ``model.attention=attention`` cannot run on ``device`` computing in ``dtype`` (``train.device`` and
    ``train.dtype``, or what their ``auto`` resolved to on this machine: ``auto_device`` says the device did), in
    one line with the fix; None when it can, or when an ``auto`` left unresolved keeps it open."""
    package = GPU_ATTENTION.get(attention)
    if package is None:
        return None
    if device == "cpu":
        why = "train.device=auto and no CUDA device is visible" if auto_device else "train.device=cpu"
        return (
            f"model.attention={attention} runs on CUDA GPUs only ({package} has no CPU kernels), but this run trains "
            f"on the CPU ({why}); use model.attention=sdpa, which runs everywhere"
        )
    if dtype == "fp32":
        kernels = (
            "flash-attn has no fp32 kernels"
            if attention == "flash"
            else "transformer-engine's fused kernels have no fp32 version; in fp32 it falls back to an unfused "
            "attention that holds the whole seq_len x seq_len score matrix"
        )
        return (
            f"model.attention={attention} computes in bf16 only ({kernels}), but this run computes in fp32 "
            "(train.dtype=fp32); set train.dtype=bf16 (or auto), or use model.attention=sdpa"
        )
    return None


def validate(cfg: Config) -> None:
    """Checks that span fields or need ranges; each failure is one line with the fix."""
    t, o, d, m, p = cfg.train, cfg.optim, cfg.data, cfg.model, cfg.parallel
    _require(bool(cfg.run_dir), "run_dir is empty; set run_dir=PATH for checkpoints and logs")
    _require(t.steps >= 1, f"train.steps must be >= 1; got {t.steps}")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1; got {t.micro_batch_size}")
    _require(
        t.global_batch_size >= t.micro_batch_size,
        f"train.global_batch_size ({t.global_batch_size}) must be >= train.micro_batch_size ({t.micro_batch_size})",
    )
    _require(t.log_interval >= 1, f"train.log_interval must be >= 1; got {t.log_interval}")
    _require(t.eval_interval >= 0, f"train.eval_interval must be >= 0; got {t.eval_interval}")
    _require(t.eval_batches >= 1, f"train.eval_batches must be >= 1; got {t.eval_batches}")
    _require(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 disables clipping); got {t.max_grad_norm}")
    if t.profile_steps is not None:
        last = profile_range(t.profile_steps)[1]
        _require(
            last <= t.steps,
            f"train.profile_steps={t.profile_steps} ends after the run's last step (train.steps={t.steps}); profile "
            "steps within the run",
        )
    _require(d.seq_len >= 2, f"data.seq_len must be >= 2; got {d.seq_len}")
    c, g = cfg.checkpoint, cfg.guard
    _require(c.interval >= 0, f"checkpoint.interval must be >= 0 (0: no periodic checkpoints); got {c.interval}")
    _require(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1; got {c.keep_last}")
    _require(c.keep_every >= 0, f"checkpoint.keep_every must be >= 0; got {c.keep_every}")
    _require(bool(c.resume), "checkpoint.resume is empty; use auto, none or the path of a checkpoint folder")
    _require(g.rollback_after >= 0, f"guard.rollback_after must be >= 0 (0: never roll back); got {g.rollback_after}")
    _require(g.max_rollbacks >= 0, f"guard.max_rollbacks must be >= 0; got {g.max_rollbacks}")
    _require(g.spike_loss_sigma >= 0, f"guard.spike_loss_sigma must be >= 0 (0: off); got {g.spike_loss_sigma}")
    _require(
        g.spike_grad_norm_ratio == 0 or g.spike_grad_norm_ratio > 1,
        f"guard.spike_grad_norm_ratio must be > 1 (or 0: off); got {g.spike_grad_norm_ratio}",
    )
    _require(g.spike_window >= 2, f"guard.spike_window must be >= 2 (accepted steps); got {g.spike_window}")
    if spike_rule_on(g):
        _require(g.enabled, "guard.spike_loss_sigma and guard.spike_grad_norm_ratio need guard.enabled=true")
        _require(
            not o.per_layer,
            "guard.spike_loss_sigma and guard.spike_grad_norm_ratio cannot run with optim.per_layer=true (the "
            "update is applied inside backward, before the step can be judged); set both to 0 or per_layer=false",
        )
    _require(o.lr > 0, f"optim.lr must be > 0; got {o.lr}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {o.warmup_steps}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1]; got {o.min_lr_ratio}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {o.weight_decay}")
    _require(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must each be in [0, 1); got {list(o.betas)}")
    _require(o.eps > 0, f"optim.eps must be > 0; got {o.eps}")
    _require(m.rope_theta > 0, f"model.rope_theta must be > 0; got {m.rope_theta}")
    _require(
        m.max_position_embeddings is None or m.max_position_embeddings >= cfg.data.seq_len,
        f"model.max_position_embeddings={m.max_position_embeddings} is shorter than data.seq_len={cfg.data.seq_len}, "
        "the context the model trains at; raise it or leave it null",
    )
    _require(m.init_std > 0, f"model.init_std must be > 0; got {m.init_std}")
    _require(
        t.param_dtype == "fp32" or t.dtype != "fp32" or cfg.parallel.backend != "deepspeed",
        "train.param_dtype=bf16 with train.dtype=fp32 (bf16 weights computed in fp32) cannot run with "
        "parallel.backend=deepspeed: DeepSpeed's bf16 mode computes in bf16; set train.dtype=bf16 (or auto)",
    )
    # train.device and train.dtype as written; what `auto` resolves to on this machine is checked when the run
    # starts (registry.check_runtime).
    attention = attention_problem(m.attention, device=t.device, dtype=t.dtype)
    _require(attention is None, attention or "")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(m, name)
        _require(value is None or value >= 1, f"model.{name} must be >= 1 (or null); got {value}")
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3; got {p.zero_stage}")
    if m.name not in MODEL_SIZES:  # pragma: no cover - Literal already guards it
        raise ConfigError(f"model.name must be one of {', '.join(MODEL_SIZES)}")
    _require(
        bool(d.path) or d.builtin is not None or bool(d.blend),
        "data.path is empty; point it at a shard folder made by megatron-pept-prepare-data (tools/prepare_data.py "
        "in a checkout), or set data.builtin",
    )
    for i, source in enumerate(d.blend):
        _require(bool(source.path), f"data.blend[{i}].path is empty; give each blended source a shard folder")
        _require(source.weight > 0, f"data.blend[{i}].weight must be > 0; got {source.weight}")
