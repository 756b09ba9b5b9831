"""The orthogonalised optimizers: Muon, NorMuon and Dion, with AdamW for what they do not orthogonalise.

One optimizer, :class:`OrthogonalOptimizer`, steps every group by its ``algorithm``:

* ``muon`` (Jordan et al. 2024; Moonlight, Liu et al. 2025): momentum ``B <- mu B + (1 - mu) G`` (torch's
  ``lerp`` form), Nesterov ``U = (1 - mu) G + mu B``, ``O = NS5(U)`` (:func:`newton_schulz`, in bf16 by default),
  decoupled weight decay, ``W <- W - lr * ratio * O`` with ``ratio`` from :func:`muon_lr_ratio`. This is
  ``torch.optim.Muon`` (torch 2.13) to the bit (a test holds it to that).
* ``normuon`` (NorMuon, Li et al. 2025, Algorithm 1): Muon's ``O`` normalised per neuron (row) by a second moment
  of its rows, ``v <- beta2 v + (1 - beta2) mean_cols(O * O)``, ``O' = O / (sqrt(v) + eps)``, then rescaled: to an
  RMS of 0.2 (``match_rms_adamw``, the paper's ``0.2 sqrt(mn) / ||O'||_F``) or to ``O``'s own norm with Muon's
  original ratio (``original``, the official code's). pytorch-optimizer 4.1.0's ``NorMuon`` (``foreach=False``)
  computes the same to the bit with the same Newton-Schulz (tested).
* ``dion`` (Ahn et al. 2025, Algorithm 1): ``B = M + G``; one power iteration from the last right factor ``Q``,
  ``P = orth(B Q)``, ``R = B^T P``; error feedback ``M <- B - (1 - mu) P R^T``; ``Q <- R`` with unit columns;
  ``W <- W - lr * scale * P Q^T``, ``scale`` the paper's ``sqrt(m / n)`` (``original``) or the one that gives the
  update an RMS of 0.2 like Muon's (``match_rms_adamw``: ``0.2 sqrt(mn / r)``, since ``||P Q^T||_F^2 = r``).
  ``orth`` is a randomized Cholesky QR (the paper's distributed orthonormalisation): it needs only ``r x r`` and
  ``k x r`` sums over the rows, so it runs on row shards unchanged.
* ``adamw``: torch's AdamW arithmetic (single-tensor form), for embeddings, the LM head, norms and biases.

**Views.** A parameter reaches the optimizer whole (one process, DDP), as an FSDP2 row shard, or as pieces of
DeepSpeed ZeRO's flat partitions; each is handled as a :class:`~megatron_pept.sharding.FlatFragment` of the whole
matrix. Momentum, Adam's moments and the weight update are element-wise, so each rank keeps and applies its own
part. Newton-Schulz needs the whole matrix: the sharded matrices of a step are shared out among the ranks, largest
first, one per rank per round (so the work per rank is balanced by size and no rank orthogonalises everything);
each rank's fragment is gathered to the owner in the Newton-Schulz dtype (bf16 by default: the iteration's first
step casts to it anyway, so this is exact and half the bytes), the owner computes the update and scatters each rank
its elements back (in the Newton-Schulz dtype; NorMuon's normalised update in fp32). NorMuon's per-row second
moment is updated by the owner and broadcast (``m`` floats), so it is whole on every rank. Dion needs no owner:
``B Q`` is local to the rows a rank holds (rows a ZeRO fragment cuts are completed across ranks), and the
orthonormalisation and ``R = B^T P`` are sums over rows (all-reduces of ``r x r``, ``k x r`` and ``n x r``), the
collectives of the paper's distributed algorithm. A matrix one rank holds whole (most of them under ZeRO-1/2) is done
there with no traffic. With one process every collective is skipped and the arithmetic is the same.

Every piece of state is a tensor in ``state_dict()``: ``step`` (a host counter), ``momentum_buffer`` (by rows under
FSDP2, per fragment under ZeRO), ``normuon_v`` (``m x 1``, whole), ``dion_q`` (``n x r``, whole), ``exp_avg`` and
``exp_avg_sq`` for AdamW groups.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_pept.optim.adamw import KeepStateDtypes
from megatron_pept.optim.projector import name_seed, projection_seed
from megatron_pept.optim.sharded import ShardedOptimizer
from megatron_pept.optim.weight_update import WeightUpdate
from megatron_pept.sharding import FlatFragment, RowShard, ZeroLayout, all_reduce_, row_chunks

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton-Schulz coefficients of Keller Jordan's Muon (and ``torch.optim.Muon``)."""
NS_EPS = 1e-7
ALGORITHMS = ("muon", "normuon", "dion", "adamw")
LR_ADJUSTS = ("match_rms_adamw", "original")
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RCQR_OVERSAMPLE = 1.25
"""Rows of the randomized Cholesky QR's sketch per column of ``P`` (the Dion paper's 1.25)."""

MUON_GROUP_DEFAULTS: dict[str, Any] = dict(
    algorithm="adamw",
    momentum=0.95,
    nesterov=True,
    ns_steps=5,
    ns_dtype="bf16",
    lr_adjust="match_rms_adamw",
    normuon_beta2=0.95,
    normuon_eps=1e-10,
    dion_rank=128,
    dion_rank_fraction=None,
    dion_eps=1e-8,
    seed=0,
)


# -- the pure functions -------------------------------------------------------------------------------------------


def newton_schulz(
    update: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal polar factor of the matrix ``update``, in
    ``dtype`` (a new tensor of that dtype): the operations of ``torch.optim.Muon``'s, in the same order (the matrix
    transposed when tall, scaled to unit Frobenius norm, ``steps`` rounds of ``X <- a X + (b A + c A^2) X`` with
    ``A = X X^T``). Its singular values land roughly in [0.7, 1.2], not exactly 1 (that is by design)."""
    if update.ndim != 2:
        raise ValueError(f"Newton-Schulz orthogonalises matrices; got a tensor of shape {tuple(update.shape)}")
    a, b, c = coefficients
    x = update.to(dtype, copy=True)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(shape: torch.Size | tuple[int, ...], rule: str) -> float:
    """The factor Muon multiplies its learning rate by for an ``A x B`` matrix: ``original`` (Keller Jordan's)
    ``sqrt(max(1, A / B))``; ``match_rms_adamw`` (Moonlight's) ``0.2 sqrt(max(A, B))``, which gives the update an RMS
    of about 0.2, AdamW's typical one, so that AdamW's learning rate and weight decay transfer."""
    rows, cols = shape[0], shape[1]
    if rule == "original":
        return math.sqrt(max(1, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"lr_adjust must be one of {', '.join(LR_ADJUSTS)}; got {rule!r}")


def dion_scale(shape: torch.Size | tuple[int, ...], rank: int, rule: str) -> float:
    """The factor Dion multiplies its learning rate by for an ``m x n`` matrix at rank ``r``: ``original`` the
    paper's ``sqrt(m / n)``; ``match_rms_adamw`` ``0.2 sqrt(mn / r)``, which gives ``P Q^T`` (``r`` unit columns
    of ``Q`` times orthonormal ``P``: ``||P Q^T||_F^2 = r``) an RMS of exactly 0.2, as Muon's ``match_rms_adamw``."""
    m, n = shape[0], shape[1]
    if rule == "original":
        return math.sqrt(m / n)
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(m * n / rank)
    raise ValueError(f"lr_adjust must be one of {', '.join(LR_ADJUSTS)}; got {rule!r}")


def dion_rank(shape: torch.Size | tuple[int, ...], *, rank: int, fraction: float | None) -> int:
    """Dion's rank for a matrix: ``fraction`` of its smaller side (rounded, at least 1) when given, else ``rank``;
    at most the smaller side."""
    side = min(shape[0], shape[1])
    if fraction is not None:
        return max(1, min(side, round(fraction * side)))
    return max(1, min(side, rank))


def normuon_normalize(
    o: torch.Tensor, v: torch.Tensor, *, beta2: float, eps: float, rule: str
) -> tuple[torch.Tensor, float]:
    """NorMuon's per-neuron normalisation of an orthogonalised update ``o`` (fp32, ``m x n``, changed in place):
    updates the row second moment ``v`` (``m x 1``) and returns the normalised, rescaled update and the learning-rate
    factor to use (1 for ``match_rms_adamw``, whose rescaling already gives the paper's RMS of 0.2)."""
    original_norm = o.norm()
    v.lerp_(o.square().mean(dim=-1, keepdim=True), 1.0 - beta2)
    o.div_(v.sqrt().add_(eps))
    if rule == "match_rms_adamw":
        o.mul_(0.2 * math.sqrt(o.numel()) / o.norm().add_(eps))
        return o, 1.0
    o.mul_(original_norm / o.norm().add_(eps))
    return o, muon_lr_ratio(o.shape, "original")


def dion_sketch(rows: int, rank: int, *, seed: int, device: Any = "cpu") -> torch.Tensor:
    """The randomized Cholesky QR's Gaussian sketch for an ``rows x rank`` factor: ``ceil(1.25 r) x rows``, entries
    of variance ``1 / k``, drawn on ``device`` from ``seed`` (the same on every rank of a device type, each using its
    rows' columns; drawn there, so no step copies it from the host)."""
    k = math.ceil(RCQR_OVERSAMPLE * rank)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(k, rows, generator=gen, device=device).div_(math.sqrt(k))


def orthonormalize_rows(
    p_rows: torch.Tensor, sketch_cols: torch.Tensor, owned: torch.Tensor, reduce: Any
) -> torch.Tensor:
    """The columns of ``P`` orthonormalised by a randomized Cholesky QR, computed from the rows of ``P`` a rank
    holds (``p_rows``; ``owned``: 1 for the rows this rank counts, 0 for a row another rank counts too) and the
    matching columns of the sketch ``S``: ``R1`` from the QR of ``S P`` (a ``k x r`` sum over rows), ``P1 = P R1^-1``,
    then one Cholesky QR of ``P1`` (an ``r x r`` sum over rows). ``reduce(t)`` sums ``t`` over the ranks in place
    (the identity in one process). Stable where a plain Cholesky QR of an ill-conditioned ``P`` is not."""
    weighted = p_rows * owned[:, None]
    sp = reduce(sketch_cols @ weighted)
    _, r1 = torch.linalg.qr(sp, mode="r")
    r1 = _nonsingular(r1)
    p1 = torch.linalg.solve_triangular(r1, p_rows, upper=True, left=False)
    gram = reduce((p1 * owned[:, None]).T @ p1)
    r2, _ = torch.linalg.cholesky_ex(gram, upper=True)
    r2 = _nonsingular(r2)
    return torch.linalg.solve_triangular(r2, p1, upper=True, left=False)


def _nonsingular(r: torch.Tensor) -> torch.Tensor:
    """A triangular factor with no zero on its diagonal (a zero gradient gives one): those entries become 1, so the
    solve leaves the corresponding (zero) column as it is instead of making it infinite. No host synchronisation."""
    diag = r.diagonal()
    fixed = torch.where(diag.abs() > 0, diag, torch.ones_like(diag))
    return r - torch.diag_embed(diag) + torch.diag_embed(fixed)


# -- the optimizer ------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """What this rank steps of one parameter: ``param``/``grad`` (the whole tensor, an FSDP2 local shard, or a ZeRO
    fragment's 1-D view), as the fragment ``frag`` of the whole matrix; ``sharded``: other ranks hold other parts
    (collectives over ``frag.group`` complete what needs the whole)."""

    key: torch.Tensor  # the parameter whose state this is
    param: torch.Tensor
    grad: torch.Tensor
    frag: FlatFragment
    sharded: bool
    start: int = 0  # the first row this rank holds (FSDP2), for the rounding bits of bf16 weights
    zero: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.frag.shape

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_(t, self.frag.group) if self.sharded else t


@dataclass
class _Pending:
    """A Muon or NorMuon matrix waiting for its orthogonalisation: its piece, group and Nesterov update (fp32, the
    piece's elements, flat)."""

    piece: _Piece
    group: dict
    update: torch.Tensor
    local: torch.Tensor | None = None  # this rank's elements of the update to apply
    mean_square: torch.Tensor | None = None


class OrthogonalOptimizer(ShardedOptimizer, KeepStateDtypes, torch.optim.Optimizer):
    """Muon, NorMuon and Dion over the groups naming them (group key ``algorithm``), AdamW over the rest; see the
    module's documentation. ``param_names``: seeds Dion's initial right factor and its sketches by name, the same
    on every rank and in every per-layer optimizer."""

    weight_update: WeightUpdate | None = None
    """How updates reach bf16 weights (``train.param_dtype=bf16``; set by the trainer); None: fp32 weights."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        param_names: Mapping[torch.Tensor, str] | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.param_names = dict(param_names or {})
        for group in self.param_groups:
            for key, value in MUON_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            self._check_group(group)
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.zero_layout: ZeroLayout | None = None
        self._zero_first: int | None = None
        self._zero_fragments: dict[int, list[tuple[int, int]]] = {}
        self._reset_stats()

    def _check_group(self, group: dict) -> None:
        if group["algorithm"] not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {group['algorithm']!r}")
        if group["algorithm"] == "adamw":
            return
        if group["lr_adjust"] not in LR_ADJUSTS:
            raise ValueError(f"lr_adjust must be one of {', '.join(LR_ADJUSTS)}; got {group['lr_adjust']!r}")
        if group["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}; got {group['ns_dtype']!r}")
        if not 1 <= group["ns_steps"] < 100:
            raise ValueError(f"ns_steps must be in [1, 100); got {group['ns_steps']}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1); got {group['momentum']}")
        bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
        if bad:
            raise ValueError(f"{group['algorithm']} orthogonalises matrices; a parameter of shape {bad[0]} was given")
        if group["algorithm"] == "dion":
            unnamed = [tuple(p.shape) for p in group["params"] if p not in self.param_names]
            if unnamed:
                raise ValueError(
                    f"dion seeds each matrix's right factor from its name; pass param_names= with every parameter of "
                    f"the group ({len(unnamed)} unnamed, e.g. of shape {unnamed[0]})"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in MUON_GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    # -- statistics --------------------------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        # CUDA: the last step's events are read now (one step later, when they have long completed; an event not
        # yet complete is left out rather than waited for)
        events = getattr(self, "_events", [])
        self.last_ortho_seconds = sum(a.elapsed_time(b) for a, b in events if b.query()) / 1000.0
        self._events: list[tuple[Any, Any]] = []
        self.last_ortho_matrices = 0
        self.last_matrices = 0
        self.last_update_ms_sum: torch.Tensor | float = 0.0
        self.last_dion_residual_sq: torch.Tensor | float = 0.0

    def step_stats(self) -> dict[str, Any]:
        return {
            "ortho_seconds": self.last_ortho_seconds,
            "ortho_matrices": self.last_ortho_matrices,
            "matrices": self.last_matrices,
            "update_ms_sum": self.last_update_ms_sum,
            "dion_residual_sq": self.last_dion_residual_sq,
        }

    @staticmethod
    def _clock(device: torch.device) -> Any:
        """A start mark: the host's clock, or on CUDA an event recorded on the stream (the step never waits)."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _timed(self, device: torch.device, start: Any) -> None:
        """Add the time since ``start`` (:meth:`_clock`) to the step's orthogonalisation time; on CUDA a pair of
        events, read at the next step (so the logged time on a GPU is the previous step's)."""
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((start, end))
            return
        self.last_ortho_seconds += time.perf_counter() - start

    # -- views ---------------------------------------------------------------------------------------------------

    def _pieces(self, p: torch.Tensor) -> list[_Piece]:
        if self.zero_layout is not None:
            return [
                _Piece(q, f.view(p), f.view(p.grad), f, sharded=True, zero=True) for q, f in self.zero_layout[id(p)]
            ]
        if isinstance(p, DTensor):
            rows = RowShard(p)
            local, grad = p.to_local(), p.grad.to_local()
            return [_Piece(p, local, grad, rows.as_fragment(), sharded=True, start=rows.start)]
        frag = FlatFragment(p.shape, lo=0, numel=p.numel(), offset=0)
        return [_Piece(p, p, p.grad, frag, sharded=False)]

    # -- the step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self.zero_layout
        # ZeRO steps one parameter group per call: statistics restart with the first group of an optimizer step.
        if layout is None or any(id(f) == self._zero_first for g in self.param_groups for f in g["params"]):
            self._reset_stats()
        pending: list[_Pending] = []
        dion_sums: list[tuple[_Piece, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                for piece in self._pieces(p):
                    algorithm = group["algorithm"]
                    if algorithm == "adamw":
                        self._adamw(piece, group)
                    elif algorithm == "dion":
                        dion_sums.append((piece, self._dion(piece, group)))
                    else:
                        pending.append(_Pending(piece, group, self._momentum(piece, group)))
        self._orthogonalize(pending)
        for item in pending:
            self._apply_orthogonal(item)
        self._dion_stats(dion_sums)
        return loss

    def _state(self, piece: _Piece) -> dict[str, Any]:
        state = self.state[piece.key]
        if not state:
            state["step"] = torch.tensor(0.0)
        return state

    def _apply(self, piece: _Piece, state: dict[str, Any], delta_of, *, lr: float, wd: float, direct) -> None:
        """Move the weight: fp32 weights in place (``direct()``: decay first, then the update, torch's order);
        bf16 weights by one fp32 ``delta_of()`` (decay included) that :attr:`weight_update` rounds in."""
        if self.weight_update is None:
            if wd:
                piece.param.mul_(1 - lr * wd)
            direct()
            return
        delta = delta_of()
        if wd:
            delta.sub_(piece.param.float(), alpha=lr * wd)
        frag = piece.frag if piece.zero else None
        self.weight_update.add_(
            piece.key, piece.param, state, delta, start=piece.start, shape=piece.shape, fragment=frag
        )

    def _adamw(self, piece: _Piece, group: dict) -> None:
        """torch's single-tensor AdamW on this piece."""
        state = self._state(piece)
        grad = piece.grad if piece.grad.dtype == torch.float32 else piece.grad.float()
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        self._apply(
            piece,
            state,
            lambda: (exp_avg / denom).mul_(-step_size),
            lr=lr,
            wd=wd,
            direct=lambda: piece.param.addcdiv_(exp_avg, denom, value=-step_size),
        )

    def _momentum(self, piece: _Piece, group: dict) -> torch.Tensor:
        """Muon's momentum step on this piece; returns the (Nesterov) update to orthogonalise, flat."""
        state = self._state(piece)
        grad = piece.grad if piece.grad.dtype == torch.float32 else piece.grad.float()
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
            if group["algorithm"] == "normuon":
                state["normuon_v"] = torch.zeros(piece.shape[0], 1, dtype=torch.float32, device=grad.device)
        state["step"] += 1
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()
        return update.reshape(-1)

    def _ns(self, whole: torch.Tensor, group: dict) -> torch.Tensor:
        start = self._clock(whole.device)
        out = newton_schulz(whole, steps=group["ns_steps"], dtype=NS_DTYPES[group["ns_dtype"]])
        self._timed(whole.device, start)
        self.last_ortho_matrices += 1
        return out

    def _finish(self, item: _Pending, whole: torch.Tensor) -> torch.Tensor:
        """The update of a whole matrix, where the whole matrix is (this process, or the owner rank): Newton-Schulz,
        then NorMuon's normalisation (its row moment updated); adds the update's mean square to the statistics."""
        group = item.group
        out = self._ns(whole, group)
        factor = self._factor(item)
        if group["algorithm"] == "normuon":
            out, _ = normuon_normalize(
                out.float(),
                self.state[item.piece.key]["normuon_v"],
                beta2=group["normuon_beta2"],
                eps=group["normuon_eps"],
                rule=group["lr_adjust"],
            )
        # the mean square of the update per unit of learning rate
        item.mean_square = out.float().square().mean().double() * factor**2
        return out

    @staticmethod
    def _factor(item: _Pending) -> float:
        """The learning-rate factor of a Muon or NorMuon matrix (its shape and rule only: the same on every rank)."""
        group, shape = item.group, item.piece.shape
        if group["algorithm"] == "normuon":
            return 1.0 if group["lr_adjust"] == "match_rms_adamw" else muon_lr_ratio(shape, "original")
        return muon_lr_ratio(shape, group["lr_adjust"])

    def _fragments(self, piece: _Piece, world: int) -> list[tuple[int, int]]:
        """Every rank's ``(lo, numel)`` of a sharded matrix: from FSDP2's row layout, or from the table of ZeRO's
        fragments exchanged once when ZeRO attached (:meth:`attach_zero`)."""
        if piece.zero:
            return self._zero_fragments[id(piece.key)]
        cols = piece.frag.cols
        return [(start * cols, (stop - start) * cols) for start, stop in row_chunks(piece.shape[0], world)]

    def _orthogonalize(self, pending: list[_Pending]) -> None:
        """This rank's elements of each pending matrix's update (``item.local``). Whole matrices are done here.
        Sharded ones are shared out among the ranks, largest first, one per rank per round: each rank's fragment is
        gathered to the owner (``gather`` in the Newton-Schulz dtype, fragments padded to the largest), the owner
        computes the update and scatters each rank its elements back (``scatter``, in the Newton-Schulz dtype for
        Muon, fp32 for NorMuon, whose row moment the owner also broadcasts: ``m`` floats). Per rank that sends
        about ``2 / world`` of the matrices' bytes (in bf16), not the whole of them."""
        shared = []
        for item in pending:
            if item.piece.sharded:
                shared.append(item)
            else:
                item.local = self._finish(item, item.update.view(item.piece.shape)).reshape(-1)
                self.last_update_ms_sum = self.last_update_ms_sum + item.mean_square
        if not shared:
            return
        group = shared[0].piece.frag.group
        world, me = dist.get_world_size(group), dist.get_rank(group)
        owners = [dist.get_global_rank(group, k) for k in range(world)]
        owned_ms = torch.zeros((), dtype=torch.float64, device=shared[0].update.device)
        # A matrix one rank holds whole (most of them under ZeRO-1/2, whose partitions cut the flattened model in a
        # few places) is done there with no traffic; NorMuon's row moment is broadcast from it all the same.
        solo, split, works = [], [], []
        for item in shared:
            table = self._fragments(item.piece, world)
            holders = [r for r, (_, n) in enumerate(table) if n]
            (solo if len(holders) == 1 else split).append((item, holders[0] if holders else 0))
        for item, holder in solo:
            if holder == me:
                item.local = self._finish(item, item.update.view(item.piece.shape)).reshape(-1)
                owned_ms += item.mean_square
            else:
                item.local = item.update  # empty: this rank holds none of it
            if item.group["algorithm"] == "normuon":
                v = self.state[item.piece.key]["normuon_v"]
                works.append(dist.broadcast(v, src=owners[holder], group=group, async_op=True))
        for work in works:
            work.wait()
        shared = [item for item, _ in split]
        # Largest first, then in the step's order: the same list on every rank (shapes only).
        order = sorted(range(len(shared)), key=lambda i: (-shared[i].piece.shape.numel(), i))
        for first in range(0, len(order), world):
            round_ = [shared[i] for i in order[first : first + world]]  # item k is owned by rank k
            tables = [self._fragments(item.piece, world) for item in round_]
            received: list[torch.Tensor] | None = None
            works = []
            for k, (item, table) in enumerate(zip(round_, tables)):
                # in the Newton-Schulz dtype: its first operation casts the update to it, so a bf16 gather gives the
                # owner exactly what one process would iterate on, in half the bytes
                width, dtype = max(n for _, n in table), NS_DTYPES[item.group["ns_dtype"]]
                send = item.update.new_zeros(width, dtype=dtype)
                send[: item.update.numel()] = item.update
                gathered = [send.new_empty(width) for _ in range(world)] if k == me else None
                if k == me:
                    received = gathered
                works.append(dist.gather(send, gathered, dst=owners[k], group=group, async_op=True))
            for work in works:
                work.wait()
            works = []
            for k, (item, table) in enumerate(zip(round_, tables)):
                width = max(n for _, n in table)
                dtype = torch.float32 if item.group["algorithm"] == "normuon" else NS_DTYPES[item.group["ns_dtype"]]
                pieces = None
                if k == me:
                    whole = received[0].new_zeros(item.piece.shape.numel())
                    for (lo, n), part in zip(table, received):
                        whole[lo : lo + n] = part[:n]
                    out = self._finish(item, whole.view(item.piece.shape)).reshape(-1)
                    owned_ms += item.mean_square
                    pieces = [out.new_zeros(width) for _ in range(world)]
                    for (lo, n), part in zip(table, pieces):
                        part[:n] = out[lo : lo + n]
                mine = torch.empty(width, dtype=dtype, device=item.update.device)
                works.append(dist.scatter(mine, pieces, src=owners[k], group=group, async_op=True))
                item.local = mine[: item.update.numel()]
                if item.group["algorithm"] == "normuon":  # the owner's new row moment, whole on every rank again
                    v = self.state[item.piece.key]["normuon_v"]
                    works.append(dist.broadcast(v, src=owners[k], group=group, async_op=True))
            for work in works:
                work.wait()
        self.last_update_ms_sum = self.last_update_ms_sum + all_reduce_(owned_ms, group)

    def _apply_orthogonal(self, item: _Pending) -> None:
        """Muon's or NorMuon's weight update on this rank's piece, from its elements of the whole update."""
        piece, group = item.piece, item.group
        state = self.state[piece.key]
        lr = group["lr"]
        step_lr = lr * self._factor(item)
        self.last_matrices += 1
        mine = item.local
        param = piece.param.view(-1) if piece.param.is_contiguous() else piece.param.reshape(-1)
        self._apply(
            piece,
            state,
            lambda: mine.float().mul(-step_lr).view_as(piece.param),
            lr=lr,
            wd=group["weight_decay"],
            direct=lambda: param.add_(mine, alpha=-step_lr),
        )

    def _dion(self, piece: _Piece, group: dict) -> torch.Tensor:
        """One Dion step on this rank's rows of a matrix (see the module's documentation); returns the local sums
        of the squared residual ``B - P R^T`` and of the squared update, for the statistics."""
        state = self._state(piece)
        f = piece.frag
        m, n = piece.shape
        grad = piece.grad if piece.grad.dtype == torch.float32 else piece.grad.float()
        rank = dion_rank(piece.shape, rank=group["dion_rank"], fraction=group["dion_rank_fraction"])
        if "momentum_buffer" not in state:
            seed = name_seed(self.param_names[piece.key], base_seed=group["seed"])
            state["seed"] = torch.tensor(seed)
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
            gen = torch.Generator(device=grad.device).manual_seed(seed)
            state["dion_q"] = torch.randn(n, rank, generator=gen, device=grad.device)
        state["step"] += 1
        start = self._clock(grad.device)
        buf = state["momentum_buffer"]
        buf.add_(grad)  # B = M + G
        flat = buf.view(-1) if buf.is_contiguous() else buf.reshape(-1)
        block = f.rows_block(flat)  # this rank's rows, zeros where another rank holds a row's elements
        q = state["dion_q"]
        p_rows = block @ q
        if piece.sharded:
            p_rows = f.complete_edge_rows(p_rows)
        owned = torch.ones(f.r1 - f.r0, dtype=p_rows.dtype, device=p_rows.device)
        if f.numel and f.lo % f.cols:  # a row cut by this fragment's start is counted by the rank holding its start
            owned[0] = 0
        sketch = dion_sketch(m, rank, seed=projection_seed(int(state["seed"]), int(state["step"])), device=q.device)
        p_rows = orthonormalize_rows(p_rows, sketch[:, f.r0 : f.r1], owned, piece.reduce)
        r = piece.reduce(block.T @ p_rows)  # n x r: B^T P
        low = f.from_rows(p_rows @ r.T)
        residual_sq = (flat - low).square().sum()  # what the rank-r approximation misses: B - P R^T
        flat.sub_(low, alpha=1 - group["momentum"])  # error feedback: M = B - (1 - mu) P R^T
        q_new = r / (r.norm(dim=0, keepdim=True) + group["dion_eps"])
        q.copy_(q_new)
        scale = dion_scale(piece.shape, rank, group["lr_adjust"])
        update = f.from_rows(p_rows @ q.T)
        self._timed(grad.device, start)
        self.last_ortho_matrices += 1
        self.last_matrices += 1
        lr = group["lr"]
        param = piece.param.view(-1) if piece.param.is_contiguous() else piece.param.reshape(-1)
        self._apply(
            piece,
            state,
            lambda: update.mul(-lr * scale).view_as(piece.param),
            lr=lr,
            wd=group["weight_decay"],
            direct=lambda: param.add_(update, alpha=-lr * scale),
        )
        return torch.stack([residual_sq, update.square().sum() * scale**2 / (m * n)])

    def _dion_stats(self, sums: list[tuple[_Piece, torch.Tensor]]) -> None:
        """Add Dion's squared residuals and the mean squares of its updates to the step's statistics: the sums of
        sharded matrices over the ranks in one all-reduce for the step, not one per matrix."""
        if not sums:
            return
        total = torch.zeros(2, dtype=torch.float64, device=sums[0][1].device)
        shared = [(piece, s) for piece, s in sums if piece.sharded]
        for piece, s in sums:
            if not piece.sharded:
                total += s.double()
        if shared:
            total += shared[0][0].reduce(torch.stack([s for _, s in shared]).sum(dim=0)).double()
        self.last_dion_residual_sq = self.last_dion_residual_sq + total[0]
        self.last_update_ms_sum = self.last_update_ms_sum + total[1]

    # -- checkpoints and ZeRO ----------------------------------------------------------------------------------

    def state_layout(self, p: torch.Tensor, key: str) -> str:
        """``step``, ``seed``, NorMuon's ``normuon_v`` and Dion's ``dion_q`` are whole on every rank; momentum and
        Adam's moments follow the parameter's rows (FSDP2) or are per fragment (ZeRO)."""
        if key in ("step", "seed", "normuon_v", "dion_q"):
            return "replicated"
        return "local" if self.zero_layout is not None else "rows"

    def attach_zero(self, layout: ZeroLayout) -> None:
        """Under ZeRO the owner of a matrix gathers its fragments, which may start and end anywhere: every rank's
        ``(lo, numel)`` of every parameter is exchanged here, once (not at a step)."""
        super().attach_zero(layout)
        self._zero_first = next(iter(layout), None)
        pieces = [(q, f) for frags in layout.values() for q, f in frags]
        self._zero_fragments = {}
        if not pieces:
            return
        group = pieces[0][1].group
        mine = [(f.lo, f.numel) for _, f in pieces]
        tables: list[list[tuple[int, int]]] = [[] for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(tables, mine, group=group)
        for i, (q, _) in enumerate(pieces):
            self._zero_fragments[id(q)] = [tuple(table[i]) for table in tables]
