"""Low-rank adapted linear layers (LoRA, DoRA, PiSSA, QR) and the math of their merges and re-initialisations.

:class:`LowRankLinear` is an ``nn.Linear`` whose ``weight`` is frozen and which adds a trainable rank-``r`` term
``scale * B @ A`` (``A: r x in``, ``B: out x r``, ``scale = alpha / r``, the names and layout of peft). The kinds
differ in how the factors are made from the current weight, and DoRA also in the forward:

==========  ===================================================================  ============================
kind        (re)initialisation from the current effective weight ``W``           function at (re)init
==========  ===================================================================  ============================
``lora``    base ``W``; ``A`` Kaiming-uniform, ``B = 0``                          unchanged (``B A = 0``)
``dora``    base ``W``; magnitude ``m = ||W||`` per output row; ``A``, ``B``      unchanged (``m W/||W|| = W``)
            as LoRA; forward ``m * (W + s B A) / ||W + s B A||`` (norm detached)
``pissa``   top-``r`` SVD ``U S V^T`` of ``W``: ``B = U sqrt(S/s)``,              unchanged (up to rounding)
            ``A = sqrt(S/s) V^T``, base ``W - s B A`` (the residual)
``qr``      QR ``W = Q R``: ``B = Q[:, :r]``, ``A = R[:r] / s``; base ``W``       **changes**: ``W + Q_r R_r``
            (the Approximations paper's eq. 5, taken literally); with             (residual: unchanged)
            ``residual=True`` the base is ``W - Q_r R_r`` instead
==========  ===================================================================  ============================

A *merge* folds the adapter into the base, giving the dense effective weight (for DoRA the normalised one); a
*restart* merges and then re-initialises from the merged weight, so for every kind but literal ``qr`` the layer
computes the same function right after a restart as right before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_pept.errors import ConfigError
from megatron_pept.quant import dequantize, part_shapes, quantize
from megatron_pept.sharding import LOCAL_ACCESS, ParamAccess

LOWRANK_KINDS = ("lora", "dora", "pissa", "qr")


@torch.no_grad()
def kaiming_lora_init(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    access: ParamAccess = LOCAL_ACCESS,
) -> None:
    """LoRA's initialisation: ``A`` as nn.Linear's default (Kaiming-uniform, a=sqrt(5)), ``B`` zeros.

    The values are drawn for the whole matrix (then sharded), so they do not depend on how ``A`` is sharded."""
    bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix
    device = generator.device if generator is not None else a.device
    values = torch.empty(a.shape, dtype=torch.float32, device=device).uniform_(-bound, bound, generator=generator)
    access.set(a, values)
    access.set(b, torch.zeros(b.shape, dtype=torch.float32))


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of a ``[out, in]`` weight (DoRA's column norm of ``W^T``), in fp32."""
    return torch.linalg.vector_norm(weight.float(), dim=1)


def pissa_factors(weight: torch.Tensor, *, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's principal factors of ``weight``: ``scale * B @ A`` is its best rank-``rank`` approximation."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def qr_factors(weight: torch.Tensor, *, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLoQRa's factors: ``B = Q[:, :r]`` and ``A = R[:r] / scale`` from the reduced QR of ``weight``."""
    q, r = torch.linalg.qr(weight.float(), mode="reduced")
    return r[:rank] / scale, q[:, :rank].contiguous()


class LowRankLinear(nn.Linear):
    """A frozen ``weight`` plus a trainable low-rank term; see the module docstring for the kinds.

    ``lowrank_active`` False makes it a plain linear layer (used for the full-rank warm start: the base trains,
    the adapters are skipped).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        kind: str = "lora",
        dropout: float = 0.0,
        qr_residual: bool = False,
        base_dtype: torch.dtype | None = None,
        base_format: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if kind not in LOWRANK_KINDS:
            raise ValueError(f"unknown low-rank kind {kind!r}; choose one of {', '.join(LOWRANK_KINDS)}")
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(
                f"rank {rank} must be between 1 and min(in, out) = {min(in_features, out_features)} for a "
                f"{out_features}x{in_features} layer; lower method.rank"
            )
        super().__init__(in_features, out_features, bias=False, device=device, dtype=base_dtype)
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.kind, self.qr_residual = rank, alpha, kind, qr_residual
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.magnitude = nn.Parameter(torch.empty(out_features, device=device)) if kind == "dora" else None
        if kind in ("pissa", "qr"):
            # The factors as (re)initialised: the effective weight at the start of a cycle is base + s B0 A0, which
            # the update merged at the end of the cycle is measured against.
            self.register_buffer("lora_A0", torch.empty(rank, in_features, device=device))
            self.register_buffer("lora_B0", torch.empty(out_features, rank, device=device))
        # A quantised base (megatron_pept.quant): the forward of the low-rank phase uses the dequantised base; the
        # exact fp32 ``weight`` is the master that merges go into, quantised afresh at each (re)initialisation, so
        # requantisation never drifts (docs/benchmarks.md).
        self.base_format = base_format
        if base_format is not None:
            for name, (shape, dtype) in part_shapes(base_format, (out_features, in_features)).items():
                self.register_buffer(f"base_{name}", torch.empty(shape, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lowrank_active = True
        # How whole tensors are read and written (plain, FSDP2 shards, DeepSpeed ZeRO partitions).
        self.param_access: ParamAccess = LOCAL_ACCESS

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> LowRankLinear:
        """A low-rank layer of the same shape and device (weights are filled in later by init or a checkpoint)."""
        if linear.bias is not None:
            raise ValueError("low-rank layers here have no bias; the LLaMA projections have none")
        return cls(linear.in_features, linear.out_features, device=linear.weight.device, **kwargs)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_A, self.lora_B, self.magnitude) if p is not None]

    def set_lowrank_active(self, active: bool) -> None:
        """Low-rank phase (base frozen, adapters train) or full-rank phase (base trains, adapters unused)."""
        self.lowrank_active = active
        self.weight.requires_grad_(not active)
        for p in self.adapter_parameters():
            p.requires_grad_(active)

    @torch.no_grad()
    def set_base_dtype(self, dtype: torch.dtype | None) -> None:
        """Store the frozen base in ``dtype`` from now on (None: keep it as it is); its values are rounded once."""
        if dtype is None or self.weight.dtype == dtype:
            return
        self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=self.weight.requires_grad)

    def _quant_parts(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"base_{name}") for name in part_shapes(self.base_format, self.weight.shape)}

    @torch.no_grad()
    def requantize(self) -> None:
        """Store the quantised base from the exact ``weight`` (after every change of the base)."""
        if self.base_format is None:
            return
        parts = quantize(self.param_access.get(self.weight).float(), self.base_format)
        for name, value in parts.items():
            self.param_access.set(getattr(self, f"base_{name}"), value)

    def base_weight(self) -> torch.Tensor:
        """The base the low-rank phase computes with: the dequantised one for a quantised base, else ``weight``."""
        if self.base_format is None or not self.lowrank_active:
            return self.weight
        return dequantize(self._quant_parts(), self.base_format, self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_weight = self.base_weight()  # dequantised once per forward for a quantised base
        use_as_is = base_weight.dtype == x.dtype or torch.is_autocast_enabled()
        weight = base_weight if use_as_is else base_weight.to(x.dtype)
        base = F.linear(x, weight)
        if not self.lowrank_active:
            return base
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        if self.magnitude is None:
            return base + update
        # DoRA: rescale each output row of (W + s B A) to the learned magnitude; the norm is treated as a constant
        # (DoRA section 4.3, as peft does).
        norm = row_norms(base_weight.float() + self.scale * self.lora_B @ self.lora_A).detach()
        return (self.magnitude / norm).to(base.dtype) * (base + update)

    @torch.no_grad()
    def merged_weight(self, *, as_computed: bool = False) -> torch.Tensor:
        """The dense weight of the exact base plus the adapter, in fp32 (whole, also when the layer is sharded):
        what a merge folds into the base. ``as_computed``: with the base the forward uses (the dequantised one for
        a quantised base), i.e. the function the layer applies (what an export ships)."""
        exact = not as_computed or self.base_format is None or not self.lowrank_active
        weight = self.param_access.get(self.weight if exact else self.base_weight()).float()
        if not self.lowrank_active:
            return weight.clone()
        merged = weight + self.scale * (
            self.param_access.get(self.lora_B).float() @ self.param_access.get(self.lora_A).float()
        )
        if self.magnitude is not None:
            merged = self.param_access.get(self.magnitude).float()[:, None] * merged / row_norms(merged)[:, None]
        return merged

    @torch.no_grad()
    def decompose(self, weight: torch.Tensor, *, generator: torch.Generator | None = None) -> None:
        """Set base and adapters from the dense ``weight`` according to the kind (see the module docstring)."""
        base = self.param_access.get(weight).float()
        if self.kind in ("lora", "dora"):
            kaiming_lora_init(self.lora_A, self.lora_B, generator=generator, access=self.param_access)
            if self.magnitude is not None:
                self.param_access.set(self.magnitude, row_norms(base))
        elif self.kind == "pissa":
            a, b = pissa_factors(base, rank=self.rank, scale=self.scale)
            base = base - self.scale * (b @ a)
        else:  # qr
            a, b = qr_factors(base, rank=self.rank, scale=self.scale)
            if self.qr_residual:
                base = base - self.scale * (b @ a)
        if self.kind in ("pissa", "qr"):
            for param, buffer, value in ((self.lora_A, self.lora_A0, a), (self.lora_B, self.lora_B0, b)):
                self.param_access.set(param, value)
                self.param_access.set(buffer, value)
        self.param_access.set(self.weight, base)
        self.requantize()  # RePiSSA and ReLoQRa quantise the residual left after their factors are taken out

    @torch.no_grad()
    def init_adapters_only(self, *, generator: torch.Generator | None = None) -> None:
        """Give the adapters defined values without touching the base (full-rank phase: they are unused)."""
        kaiming_lora_init(self.lora_A, self.lora_B, generator=generator, access=self.param_access)
        if self.magnitude is not None:
            self.param_access.set(self.magnitude, row_norms(self.param_access.get(self.weight)))
        if self.kind in ("pissa", "qr"):
            self.param_access.set(self.lora_A0, self.param_access.get(self.lora_A))
            self.param_access.set(self.lora_B0, self.param_access.get(self.lora_B))
        self.requantize()  # defined values (the full-rank phase computes with the exact weight)

    @torch.no_grad()
    def cycle_update(self, merged: torch.Tensor | None = None) -> torch.Tensor:
        """How much the effective weight moved since the last (re)initialisation (fp32, dense)."""
        start = self.param_access.get(self.weight).float()
        if self.kind in ("pissa", "qr"):
            start = start + self.scale * (self.param_access.get(self.lora_B0) @ self.param_access.get(self.lora_A0))
        return (self.merged_weight() if merged is None else merged) - start

    @torch.no_grad()
    def restart(self, *, generator: torch.Generator | None = None) -> float:
        """Merge the adapter into the base and re-initialise from the merged weight; returns the squared
        Frobenius norm of the update this cycle merged (for logging)."""
        merged = self.merged_weight()
        update_sq = float(self.cycle_update(merged).square().sum())
        self.decompose(merged, generator=generator)
        return update_sq

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, kind={self.kind}, rank={self.rank}, "
            f"alpha={self.alpha}, active={self.lowrank_active}, base={self.base_format or self.weight.dtype}"
        )
