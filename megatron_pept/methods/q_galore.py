"""Q-GaLore (``method.name=q_galore``; Zhang et al. 2024, q-galore-torch 1.0): GaLore whose projected weights are
held in int8 and updated by stochastic rounding, with an int4 projector refreshed on an adaptive gap and 8-bit Adam
moments (the optimizer: :class:`~megatron_pept.optim.galore.q_galore.QGaLoreAdamW8bit`).

Each targeted linear layer (``method.target_modules``; the LM head, embeddings and norms stay fp32 and get the
optimizer's unprojected 8-bit Adam) becomes an :class:`Int8Linear`: its weight is three parameters that never train
through autograd, ``weight`` (``uint8`` codes, ``out x in``), ``weight_scales`` (fp32) and ``weight_zeros`` (``uint8``),
both ``out x in / weight_group_size`` (group-wise min-max with a zero point, groups along each row). The forward
dequantises; the backward leaves the fp32 weight gradient in the layer (``weight_grad``) for the optimizer, which
averages it over the data-parallel ranks itself (it is no parameter's ``.grad``, so DDP and FSDP2 do not reduce it),
steps, and quantises the weight again. FSDP2 shards the three parameters by rows like any other (groups lie within
rows), and all-gathers the int8 codes, not fp32 weights.

Scalars under ``galore/``: ``refreshes``, ``svd_seconds`` and ``subspace_overlap`` (of the dequantised projectors), as
GaLore's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_pept.config import Config
from megatron_pept.errors import ConfigError
from megatron_pept.methods.base import require
from megatron_pept.methods.galore import GaLoreMethod, ProjectionSettings
from megatron_pept.methods.relora import target_linears
from megatron_pept.models import build_model, llama_args
from megatron_pept.models.init import fill_normal_rows_
from megatron_pept.optim.galore.q_galore import WEIGHT_BITS, QGaLoreAdamW8bit
from megatron_pept.optim.galore.quantize import dequantize_groups, quantize_groups
from megatron_pept.sharding import full, local_rows


@dataclass
class QGaLoreSettings(ProjectionSettings):
    """Q-GaLore's settings (q_galore): GaLore's projection plus the quantisation and the adaptive refresh."""

    family = "Q-GaLore"

    weight_group_size: int = 256
    """q_galore: elements per quantisation group of the int8 weights (along a row: it must divide each targeted
    layer's input size); q-galore-torch's --weight_group_size."""
    stochastic_round: bool = True
    """q_galore: requantise the int8 weights after each update by stochastic rounding (false: to the nearest, which
    loses updates smaller than half a quantisation step); q-galore-torch's --stochastic_round."""
    proj_quant: bool = True
    """q_galore: hold the projectors quantised (method.proj_bits wide); q-galore-torch's --proj_quant."""
    proj_bits: int = 4
    """q_galore: bits of a projector code (4: two codes a byte); q-galore-torch's --proj_bits."""
    proj_group_size: int = 256
    """q_galore: elements per quantisation group of a projector (rank x the layer's smaller side must be a multiple);
    q-galore-torch's --proj_group_size."""
    cos_threshold: float = 0.4
    """q_galore: the refresh gap grows once the mean cosine similarity of successive projectors' first singular
    vectors over the last method.queue_size refreshes reaches this; q-galore-torch's --cos_threshold."""
    gamma_proj: float = 2.0
    """q_galore: the factor the refresh gap grows by (truncated to an integer gap); q-galore-torch's --gamma_proj."""
    queue_size: int = 5
    """q_galore: how many recent similarities the rule averages; q-galore-torch's --queue_size."""

    def validate(self) -> None:
        super().validate()
        require(self.svd == "full", "method.svd must be full for q_galore (its adaptive rule compares full SVDs)")
        require(self.weight_group_size >= 1, f"method.weight_group_size must be >= 1; got {self.weight_group_size}")
        require(1 <= self.proj_bits <= 8, f"method.proj_bits must be between 1 and 8; got {self.proj_bits}")
        require(self.proj_group_size >= 1, f"method.proj_group_size must be >= 1; got {self.proj_group_size}")
        require(-1 <= self.cos_threshold <= 1, f"method.cos_threshold must be in [-1, 1]; got {self.cos_threshold}")
        require(self.gamma_proj >= 1, f"method.gamma_proj must be >= 1 (1: a fixed gap); got {self.gamma_proj}")
        require(self.queue_size >= 1, f"method.queue_size must be >= 1; got {self.queue_size}")


class _Int8LinearFunction(torch.autograd.Function):
    """``x @ W^T`` with ``W`` dequantised from the int8 codes (again in backward, rather than kept); the weight's
    gradient is added to the layer's ``weight_grad`` in fp32 (summed over micro-batches)."""

    @staticmethod
    def forward(ctx, x, codes, scales, zeros, layer):  # noqa: ANN001, ANN205
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        ctx.save_for_backward(x, codes, scales, zeros)
        weight = dequantize_groups(codes, scales, zeros, group_size=layer.group_size).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, codes, scales, zeros = ctx.saved_tensors
        layer = ctx.layer
        g = grad.to(ctx.dtype)
        rows = g.reshape(-1, g.shape[-1])
        weight_grad = (rows.T @ x.to(ctx.dtype).reshape(-1, x.shape[-1])).float()
        layer.weight_grad = weight_grad if layer.weight_grad is None else layer.weight_grad.add_(weight_grad)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_groups(codes, scales, zeros, group_size=layer.group_size).to(ctx.dtype)
            grad_x = (g @ weight).to(ctx.x_dtype)
        if layer.on_weight_grad is not None:  # per-layer updates: the layer's step, after grad_x used its weight
            layer.on_weight_grad()
        return grad_x, None, None, None, None


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is held as int8 codes with group-wise scales and zero points (see the
    module docstring); it is not an ``nn.Linear``, so the model's initialisation leaves it to the method."""

    def __init__(self, in_features: int, out_features: int, *, group_size: int, device: Any = None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ConfigError(
                f"method.weight_group_size={group_size} does not divide a targeted layer's input size {in_features}; "
                "choose a divisor of it"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8, device=device), False)
        self.weight_scales = nn.Parameter(torch.empty(out_features, groups, device=device), requires_grad=False)
        self.weight_zeros = nn.Parameter(
            torch.empty(out_features, groups, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.weight_grad: torch.Tensor | None = None  # the fp32 gradient of this step's backward passes, whole
        # Called in backward each time weight_grad was accumulated (per-layer updates step the layer there).
        self.on_weight_grad: Callable[[], None] | None = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # The codes and zero points are integers and the scales fp32 whatever the module is cast to (a cast would
        # change what they encode); device moves apply.
        keep = {name: t.dtype for name, t in self._parameters.items() if t is not None}
        out = super()._apply(fn, recurse)
        for name, dtype in keep.items():
            t = self._parameters[name]
            if t.dtype != dtype:
                self._parameters[name] = nn.Parameter(t.detach().to(dtype), requires_grad=False)
        return out

    @torch.no_grad()
    def store(self, dense_rows: torch.Tensor) -> None:
        """Quantise ``dense_rows`` (the rows of the weight this process holds) to the nearest codes."""
        codes, scales, zeros = quantize_groups(dense_rows, group_size=self.group_size, bits=WEIGHT_BITS)
        for param, value in ((self.weight, codes), (self.weight_scales, scales), (self.weight_zeros, zeros)):
            local, _ = local_rows(param)
            local.copy_(value.view(local.shape))

    def dense(self) -> torch.Tensor:
        """The whole fp32 weight the codes encode (gathered when sharded)."""
        return dequantize_groups(
            full(self.weight), full(self.weight_scales), full(self.weight_zeros), group_size=self.group_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.weight_scales, self.weight_zeros, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, group_size={self.group_size}"


def int8_layers(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Int8Linear)]


class QGaLore(GaLoreMethod):
    name = "q_galore"
    settings_class = QGaLoreSettings
    config_keys = (
        "rank",
        "target_modules",
        "galore_scale",
        "update_proj_gap",
        "weight_group_size",
        "stochastic_round",
        "proj_quant",
        "proj_bits",
        "proj_group_size",
        "cos_threshold",
        "gamma_proj",
        "queue_size",
    )
    resume_keys = ("rank", "target_modules", "weight_group_size", "proj_quant", "proj_bits", "proj_group_size")

    @classmethod
    def validate(cls, settings: QGaLoreSettings, cfg: Config) -> None:
        settings.validate()
        if cfg.parallel.backend == "deepspeed":
            raise ConfigError(
                "method.name=q_galore cannot run with parallel.backend=deepspeed: ZeRO hands the optimizer flat fp32 "
                "partitions, and Q-GaLore's int8 weights are no fp32 parameters ZeRO could partition; use "
                "parallel.backend=fsdp2 (it shards the int8 weights by rows) or ddp"
            )
        if cfg.optim.per_layer and cfg.parallel.backend != "single":
            raise ConfigError(
                f"method.name=q_galore with optim.per_layer=true runs on one process in this version (its int8 "
                f"layers step from their own backward); got parallel.backend={cfg.parallel.backend}: use "
                "parallel.backend=single or optim.per_layer=false"
            )
        if cfg.model.init_from:
            raise ConfigError(
                "method.name=q_galore cannot start from model.init_from in this version (the int8 weights are made "
                "from the run's own initialisation); drop model.init_from"
            )
        model = build_model(llama_args(cfg.model), device="meta")
        targets = [(name, module.weight.shape) for name, module in target_linears(model, settings.target_modules)]
        fits = min((in_f & -in_f for _, (_, in_f) in targets), default=1)  # the largest power of two dividing all
        for name, (out_f, in_f) in targets:
            require(
                in_f % settings.weight_group_size == 0,
                f"method.weight_group_size={settings.weight_group_size} does not divide the input size {in_f} of "
                f"{name} (groups lie within a row); choose a divisor of every targeted layer's input size, e.g. "
                f"{min(fits, 256)}",
            )
            rank = min(settings.rank, out_f, in_f)
            numel = rank * min(out_f, in_f)
            if settings.proj_quant:
                require(
                    numel % settings.proj_group_size == 0 and (settings.proj_bits > 4 or numel % 2 == 0),
                    f"method.proj_group_size={settings.proj_group_size} does not divide {name}'s projector "
                    f"({rank} x {min(out_f, in_f)} = {numel} elements); choose a divisor of it (e.g. a power of two "
                    "no larger than method.rank)",
                )

    def convert(self, model: nn.Module) -> None:
        for name, linear in target_linears(model, self.cfg.target_modules):
            if linear.bias is not None:
                raise ValueError("Int8Linear has no bias; the LLaMA projections have none")
            parent_name, _, leaf = name.rpartition(".")
            layer = Int8Linear(
                linear.in_features,
                linear.out_features,
                group_size=self.cfg.weight_group_size,
                device=linear.weight.device,
            )
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)

    def after_init(self, model: nn.Module, within: nn.Module | None = None) -> None:
        """Give each int8 layer the initial weight a plain LLaMA's layer of its name gets (the same seed, name and
        std: :mod:`megatron_pept.models.init`), only the rows this process holds, quantised to the nearest codes
        (as q-galore-torch quantises at conversion)."""
        inside = {id(m) for m in within.modules()} if within is not None else None
        for name, layer in int8_layers(model):
            if inside is not None and id(layer) not in inside:
                continue
            local, start = local_rows(layer.weight)
            dense = torch.empty(local.shape, dtype=torch.float32, device=local.device)
            weight_name = f"{name}.weight"
            fill_normal_rows_(
                dense,
                start=start,
                shape=layer.weight.shape,
                name=weight_name,
                seed=self.seed,
                std=model.init_std(weight_name),
            )
            layer.store(dense)

    def galore_targets(self, model: nn.Module) -> set[nn.Parameter]:
        return {layer.weight for _, layer in int8_layers(model)}

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The fp32 parameters autograd trains (embeddings, norms, the LM head) and the int8 codes, which the
        optimizer updates from their layers' gradients (they carry no ``.grad``)."""
        codes = {id(layer.weight) for _, layer in int8_layers(model)}
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad or id(p) in codes]

    def projected_settings(self) -> dict[str, Any]:
        c = self.cfg
        return dict(
            rank=c.rank,
            scale=c.galore_scale,
            proj_type="std",
            update_proj_gap=c.update_proj_gap,
            seed=self.seed,
            proj_quant=c.proj_quant,
            proj_bits=c.proj_bits,
            proj_group_size=c.proj_group_size,
            cos_threshold=c.cos_threshold,
            gamma_proj=c.gamma_proj,
            queue_size=c.queue_size,
            weight_group_size=c.weight_group_size,
            stochastic_round=c.stochastic_round,
        )

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.optim_cfg
        groups = self.param_groups(model)
        names = {p: n for n, p in self.trainable_parameters(model)}
        layers = {layer.weight: layer for _, layer in int8_layers(model)}
        return QGaLoreAdamW8bit(
            groups,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            param_names=names,
            int8_layers=layers,
        )

    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The plain LLaMA weights: each int8 layer's dequantised weight under ``<layer>.weight``."""
        out = {}
        layers = dict(int8_layers(model))
        skip = {f"{name}.{key}" for name in layers for key in ("weight", "weight_scales", "weight_zeros")}
        for key, value in model.state_dict().items():
            if key not in skip:
                out[key] = value.float() if value.is_floating_point() else value
        for name, layer in layers.items():
            out[f"{name}.weight"] = layer.dense()
        return out
