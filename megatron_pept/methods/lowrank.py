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
from megatron_pept.sharding import LOCAL_ACCESS, ParamAccess, full

BASE_MASTERS = ("host", "device", "none")
SHARDED_PARTS = ("q", "scale", "scalers", "absmax")  # parts with a row, block or element on dim 0 (not the tiny ones)

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


class _FrozenBaseLinear(torch.autograd.Function):
    """``x @ W^T`` for a frozen base ``W`` stored in another form than it is computed in (quantised, or bf16 under
    an fp32 compute) without keeping the computed form alive for backward: backward makes it again from the stored
    base (as QLoRA's kernels do), so a step holds one layer's dense base at a time, not the whole model's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, layer: LowRankLinear) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.layer.base_weight().to(ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None, None


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
        base_master: str = "host",
        double_quant: bool = True,
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
        # A quantised base (megatron_pept.quant): in the low-rank phase the layer holds the base only as the
        # quantised parts ``base_*`` (the forward dequantises them) and, unless ``base_master="none"``, an exact fp32
        # master ``base_master`` that merges go into and that is quantised afresh at each (re)initialisation, so
        # requantisation never drifts (docs/benchmarks.md). The dense ``weight`` parameter exists only while it
        # trains (the full-rank warm start) and until the first :meth:`decompose`.
        if base_master not in BASE_MASTERS:
            raise ConfigError(f"method.base_master must be one of {', '.join(BASE_MASTERS)}; got {base_master!r}")
        self.base_format, self.base_master_mode, self.double_quant = base_format, base_master, double_quant
        if base_format is not None:
            for name, (shape, dtype) in self._part_shapes().items():
                self.register_buffer(f"base_{name}", torch.empty(shape, dtype=dtype, device=device))
        self.master_on_host = base_master == "host"  # off the accelerator (a no-op on a CPU run)
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
        if self.weight is not None:
            self.weight.requires_grad_(not active)
        for p in self.adapter_parameters():
            p.requires_grad_(active)

    @torch.no_grad()
    def set_base_dtype(self, dtype: torch.dtype | None) -> None:
        """Store the frozen base in ``dtype`` from now on (None: keep it as it is); its values are rounded once."""
        if dtype is None or self.weight is None or self.weight.dtype == dtype:
            return
        self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=self.weight.requires_grad)

    # -- a quantised base ---------------------------------------------------------------------------------------

    @property
    def quantised(self) -> bool:
        """The base is held quantised now (a quantised format, the low-rank phase, the dense weight dropped)."""
        return self.base_format is not None and self.weight is None

    def _part_shapes(self) -> dict:
        kwargs = {"double_quant": self.double_quant} if self.base_format == "nf4" else {}
        return part_shapes(self.base_format, (self.out_features, self.in_features), **kwargs)

    def _quant_kwargs(self) -> dict:
        return {"double_quant": self.double_quant} if self.base_format == "nf4" else {}

    def dequantized_base(self) -> torch.Tensor:
        """The fp32 base the low-rank phase computes with, whole (gathered when its parts are sharded)."""
        parts = {name: full(getattr(self, f"base_{name}")) for name in self._part_shapes()}
        return dequantize(parts, self.base_format, (self.out_features, self.in_features), **self._quant_kwargs())

    @torch.no_grad()
    def hold_quantised(self, *, values: bool = True) -> None:
        """Hold the base quantised from now on: the dense ``weight`` becomes the master (or is dropped with
        ``base_master="none"``) and the parts are quantised from it (``values=False``: only the storage is made,
        for a checkpoint to fill). Idempotent; a no-op without a quantised format."""
        if self.base_format is None or self.weight is None:
            return
        dense = self.param_access.get(self.weight).float() if values else None
        self.weight = None
        if self.base_master_mode != "none":
            device = torch.device("cpu") if self.master_on_host else self.lora_A.device
            self.register_buffer("base_master", torch.zeros((self.out_features, self.in_features), device=device))
        if dense is not None:
            self._store_base(dense)

    @torch.no_grad()
    def hold_dense(self) -> None:
        """The inverse of :meth:`hold_quantised` (a layer put back into the full-rank phase): the dense trainable
        ``weight`` again, from the master (or the dequantised base without one)."""
        if not self.quantised:
            return
        dense = self.exact_base()
        if "base_master" in self._buffers:
            del self._buffers["base_master"]
        self.weight = nn.Parameter(torch.zeros(dense.shape, device=self.lora_A.device))
        self.param_access.set(self.weight, dense)

    def shard_base(self, mesh) -> None:
        """Shard the quantised parts (rows, per-row scales, blocks and block scales) and the master by their first
        dimension over ``mesh`` (FSDP2's layout; tiny parts stay whole): each rank keeps its piece, the forward
        all-gathers the parts of one layer at a time and merges gather the master. DCP reshards them on resume."""
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        self.master_on_host = False  # a sharded master lives beside the other shards
        for name in [*(f"base_{n}" for n in SHARDED_PARTS), "base_master"]:
            value = self._buffers.get(name)
            if isinstance(value, DTensor):  # sharded already
                continue
            if value is not None and value.dim() >= 1 and value.shape[0] >= mesh.size():
                value = value.to(self.lora_A.device)  # a host master joins the device's shards
                self._buffers[name] = distribute_tensor(value, mesh, [Shard(0)], src_data_rank=None)

    def exact_base(self) -> torch.Tensor:
        """The base merges start from, whole and fp32: the dense weight, the master, or (no master) the
        dequantised base."""
        if self.weight is not None:
            return self.param_access.get(self.weight).float()
        if self.base_master_mode == "none":
            return self.dequantized_base()
        return full(self.base_master).float().to(self.lora_A.device)

    @torch.no_grad()
    def _store_base(self, base: torch.Tensor) -> None:
        """Set the base to the whole fp32 ``base``: the dense weight, or the master and the quantised parts."""
        if self.weight is not None:
            self.param_access.set(self.weight, base)
            if self.base_format is not None:
                self._requantize(base)  # defined values (unused until the low-rank phase)
            return
        if self.base_master_mode != "none":
            self.param_access.set(self.base_master, base)
        self._requantize(base)

    @torch.no_grad()
    def _requantize(self, base: torch.Tensor) -> None:
        parts = quantize(base.float(), self.base_format, **self._quant_kwargs())
        for name, value in parts.items():
            self.param_access.set(getattr(self, f"base_{name}"), value)

    def _apply(self, fn, recurse=True):
        # The quantised parts and the master change device with the module but never dtype (a cast of the scales
        # would change what the parts encode; DeepSpeed's bf16 casts the whole module); a host master stays on
        # the CPU.
        keep = {n: t for n, t in self._buffers.items() if n.startswith("base_") and t is not None}
        out = super()._apply(fn, recurse)
        for name, old in keep.items():
            moved = self._buffers[name]
            if old.is_meta:
                value = moved if moved.dtype == old.dtype else torch.empty_like(moved, dtype=old.dtype)
            else:
                value = old.to(device=moved.device)
            if name == "base_master" and self.master_on_host and value.device.type != "cpu":
                value = value.cpu()
            self._buffers[name] = value
        return out

    def base_weight(self) -> torch.Tensor:
        """The base the forward computes with: the dequantised one for a quantised base, else ``weight``."""
        return self.dequantized_base() if self.quantised else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_weight = self.base_weight()  # a quantised base: dequantised once per forward, again in backward
        if self.quantised or (base_weight.dtype != x.dtype and not base_weight.requires_grad):
            base = _FrozenBaseLinear.apply(x, base_weight, self)  # no dense fp32 copy kept for backward
        else:
            base = F.linear(x, base_weight)
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
        weight = self.dequantized_base() if as_computed and self.quantised else self.exact_base()
        if not self.lowrank_active:
            return weight.clone()
        merged = weight + self.scale * (
            self.param_access.get(self.lora_B).float() @ self.param_access.get(self.lora_A).float()
        )
        if self.magnitude is not None:
            merged = self.param_access.get(self.magnitude).float()[:, None] * merged / row_norms(merged)[:, None]
        return merged

    @torch.no_grad()
    def decompose(self, weight: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> None:
        """Set base and adapters from the dense ``weight`` (default: the current exact base) according to the kind
        (see the module docstring); a quantised format is held quantised from now on."""
        base = self.exact_base() if weight is None else self.param_access.get(weight).float()
        if self.base_format is not None and self.weight is not None:
            self.hold_quantised()
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
        self._store_base(base)  # RePiSSA and ReLoQRa quantise the residual left after their factors are taken out

    @torch.no_grad()
    def init_adapters_only(self, *, generator: torch.Generator | None = None) -> None:
        """Give the adapters defined values without touching the base (full-rank phase: they are unused)."""
        kaiming_lora_init(self.lora_A, self.lora_B, generator=generator, access=self.param_access)
        if self.magnitude is not None:
            self.param_access.set(self.magnitude, row_norms(self.exact_base()))
        if self.kind in ("pissa", "qr"):
            self.param_access.set(self.lora_A0, self.param_access.get(self.lora_A))
            self.param_access.set(self.lora_B0, self.param_access.get(self.lora_B))
        if self.base_format is not None:
            self._store_base(self.exact_base())  # defined parts (the full-rank phase computes with the weight)

    @torch.no_grad()
    def cycle_update(self, merged: torch.Tensor | None = None) -> torch.Tensor:
        """How much the effective weight moved since the last (re)initialisation (fp32, dense)."""
        start = self.exact_base()
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
        dtype = self.weight.dtype if self.weight is not None else None
        return (
            f"in={self.in_features}, out={self.out_features}, kind={self.kind}, rank={self.rank}, "
            f"alpha={self.alpha}, active={self.lowrank_active}, base={self.base_format or dtype}"
            + (f", master={self.base_master_mode}" if self.base_format else "")
        )
