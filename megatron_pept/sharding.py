"""Views of a parameter as the optimizers and the backends see it, and their arithmetic: the one module below both
``optim/`` and ``distributed/`` (it imports neither).

A parameter reaches an optimizer in one of three forms:

* **whole**: a plain tensor (one process, DDP);
* **FSDP2 row shard**: a ``DTensor`` sharded on dim 0, ``torch.chunk`` layout (:class:`RowShard` says which rows
  this rank holds and gathers or sums over the mesh);
* **ZeRO flat fragment**: a contiguous range of the row-major flattening inside one of DeepSpeed's flat fp32
  partitions, possibly empty, possibly starting or ending inside a row (:class:`FlatFragment`).

:class:`ParamAccess` reads and writes whole parameters and their optimizer state whatever holds them (the base
class: plain tensors and FSDP2 DTensors; the DeepSpeed backend provides its own). :class:`ShardAwareOptimizer` is
the declared protocol of optimizers that know how their state is laid out over such views; checkpoint code and
backends reach an optimizer only through :func:`optimizer_protocol`.

The group collectives the views need are here too (:func:`all_reduce_`, :func:`all_gather_`); process-level
collectives (barriers, object broadcasts) live in :mod:`megatron_pept.distributed.comm`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

# -- collectives over a group -------------------------------------------------------------------------------------


def distributed() -> bool:
    """A process group is up (false in one plain process, where every collective here is the identity)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place (the identity without a process group); returns ``t``."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), in rank order; ``[t]`` without a process group."""
    if not distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


# -- whole tensors ------------------------------------------------------------------------------------------------


_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered when sharded); a plain tensor is returned as it is. An fp8 tensor (an fp8
    frozen base) is gathered as its bytes: gloo all-gathers no fp8 type ("Invalid scalar type")."""
    if not isinstance(t, DTensor):
        return t
    if t.dtype in _FLOAT8:
        as_bytes = DTensor.from_local(
            t.to_local().view(torch.uint8), t.device_mesh, t.placements, shape=t.shape, stride=t.stride()
        )
        return as_bytes.full_tensor().view(t.dtype)
    return t.full_tensor()


@torch.no_grad()
def assign_(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``value`` is the full tensor and ``target`` may be a shard of it.

    Every rank holds the same ``value``, so each keeps its own slice without communication.
    """
    value = value.to(dtype=target.dtype, device=target.device)
    if isinstance(target, DTensor):
        piece = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(piece.to_local())
    else:
        target.copy_(value)


class ParamAccess:
    """Read and write whole parameters and their optimizer state, whatever holds them.

    The methods' restarts and resets go through this: plain tensors and FSDP2 DTensors are handled here; the
    DeepSpeed backend (:class:`megatron_pept.distributed.deepspeed.DeepSpeedAccess`) reaches into ZeRO's
    partitioned fp32 master weights and optimizer state.
    """

    def get(self, t: torch.Tensor) -> torch.Tensor:
        return full(t)

    def set(self, t: torch.Tensor, value: torch.Tensor) -> None:
        assign_(t, value)

    def get_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
        value = optimizer.state.get(p, {}).get(key)
        return full(value) if torch.is_tensor(value) else None

    def set_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
        assign_(optimizer.state[p][key], value)

    def state_keys(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[str]:
        """Keys of the per-element state tensors of ``p`` (not the step counter)."""
        return [k for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.numel() > 1]

    def numel(self, t: torch.Tensor) -> int:
        """Elements of the whole tensor (a partitioned one included)."""
        return t.numel()


LOCAL_ACCESS = ParamAccess()


# -- FSDP2 row shards ---------------------------------------------------------------------------------------------


def row_chunks(rows: int, world: int) -> list[tuple[int, int]]:
    """Every rank's rows ``[start, stop)`` of a parameter of ``rows`` rows that FSDP2 shards on dim 0 over ``world``
    ranks (``torch.chunk`` layout: ``ceil(rows / world)`` each, the last ones fewer or none)."""
    chunk = -(-rows // world)
    return [(min(r * chunk, rows), min(r * chunk + chunk, rows)) for r in range(world)]


class RowShard:
    """The rows ``[start, stop)`` a rank holds of a parameter FSDP2 shards on dim 0 (``torch.chunk`` layout: each
    rank ``ceil(rows / world)`` rows, the last ones fewer or none), and the collectives over its mesh."""

    def __init__(self, dt: DTensor) -> None:
        if len(dt.placements) != 1 or dt.placements[0] != Shard(0):
            raise ValueError(f"only parameters sharded by rows (Shard(0)) are supported; got {dt.placements}")
        self.shape = dt.shape
        self.mesh, self.placements, self.stride = dt.device_mesh, dt.placements, dt.stride()
        self.group = self.mesh.get_group()
        world, rank = self.mesh.size(), self.mesh.get_local_rank()
        self.start, self.stop = row_chunks(dt.shape[0], world)[rank]

    @property
    def cols(self) -> int:
        """Elements per row."""
        return self.shape.numel() // max(1, self.shape[0])

    def rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The global indices of this rank's rows."""
        return torch.arange(self.start, self.stop, device=device)

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's rows ``piece``."""
        dt = DTensor.from_local(piece, self.mesh, self.placements, shape=self.shape, stride=self.stride)
        return dt.full_tensor()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the mesh, in place."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def as_fragment(self) -> FlatFragment:
        """The same rows as a :class:`FlatFragment` of the flattened parameter (offset 0 in the local shard)."""
        return FlatFragment(
            self.shape,
            lo=self.start * self.cols,
            numel=(self.stop - self.start) * self.cols,
            offset=0,
            group=self.group,
        )


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds, as a plain tensor: ``t`` itself, or an FSDP2 DTensor's local shard
    (sharing its storage: an in-place change reaches the parameter)."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of ``t`` this process holds, as a plain tensor, and the index of the first in the whole tensor: all
    of a plain tensor (from 0), this rank's :class:`RowShard` of an FSDP2 DTensor (for filling a shard in place
    with exactly the rows the whole tensor has there, e.g. :meth:`LlamaForCausalLM.init_weights`)."""
    return local(t), RowShard(t).start if isinstance(t, DTensor) else 0


# -- ZeRO flat fragments ------------------------------------------------------------------------------------------


class FlatFragment:
    """A rank's contiguous piece ``[lo, hi)`` of a parameter's row-major flattening, at ``offset`` in a flat tensor
    (how DeepSpeed ZeRO partitions: stages 1 and 2 cut each group's concatenation into equal parts, stage 3 each
    parameter), and the operations matrix-aware optimizers need on it:

    * ``rows_block``: the fragment padded with zeros to whole rows ``[r0, r1)``, so a projection of the covered rows
      is an ordinary matmul, and the partial rows at the ends contribute partial sums that an all-reduce completes;
    * ``from_rows``: the fragment's elements of a block of whole rows;
    * ``gather``: the whole matrix from every rank's fragment (one all-reduce);
    * ``block_ids`` / ``block_sums``: statistics per block (row, head) summed across ranks.

    Every rank must call the collective operations for every parameter, in the same order, even where its fragment
    is empty: the optimizers iterate the group's parameters in ZeRO's order on every rank.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], *, lo: int, numel: int, offset: int, group=None) -> None:
        self.shape = torch.Size(shape)
        self.lo, self.numel, self.offset, self.group = int(lo), int(numel), int(offset), group
        self.hi = self.lo + self.numel
        self.cols = self.shape[-1] if len(self.shape) >= 2 else max(1, self.shape.numel())
        self.r0 = self.lo // self.cols
        self.r1 = -(-self.hi // self.cols) if self.numel else self.r0

    def __repr__(self) -> str:
        return f"FlatFragment(shape={tuple(self.shape)}, lo={self.lo}, numel={self.numel}, offset={self.offset})"

    @property
    def partial(self) -> bool:
        """This rank holds some, not all, of the parameter."""
        return 0 < self.numel < self.shape.numel()

    @property
    def cuts_a_row(self) -> bool:
        """A boundary of this fragment falls inside a row of a matrix."""
        return self.partial and len(self.shape) == 2 and bool(self.lo % self.cols or self.hi % self.cols)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This fragment's elements inside the flat tensor (a view: writes go to the flat tensor)."""
        return flat.narrow(0, self.offset, self.numel)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_(t, self.group)

    def rows_block(self, frag: torch.Tensor) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the matrix with this fragment's elements in place and zeros elsewhere."""
        block = frag.new_zeros((self.r1 - self.r0) * self.cols)
        start = self.lo - self.r0 * self.cols
        block[start : start + self.numel] = frag
        return block.view(self.r1 - self.r0, self.cols)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        start = self.lo - self.r0 * self.cols
        return rows.reshape(-1)[start : start + self.numel]

    def gather(self, frag: torch.Tensor) -> torch.Tensor:
        """The whole tensor (every rank contributes its fragment; one all-reduce of the full size)."""
        whole = frag.new_zeros(self.shape.numel())
        whole[self.lo : self.hi] = frag
        return self.all_reduce(whole).view(self.shape)

    def complete_edge_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` holds, for rows ``[r0, r1)``, sums over this fragment's elements only; rows that a partition
        boundary cuts (at most the first and the last) get the other ranks' partial sums added: one all-gather of
        two rows per rank. Every rank holding part of a cut row contributes it, so the sums are complete."""
        cut = []
        if self.numel:
            for r in sorted({self.r0, self.r1 - 1}):
                covered = min(self.hi, (r + 1) * self.cols) - max(self.lo, r * self.cols)
                if covered < self.cols:
                    cut.append(r)
        if not distributed():
            return rows
        edges = torch.full((2, rows.shape[1] + 1), -1.0, dtype=torch.float64, device=rows.device)
        for slot, r in enumerate(cut):
            edges[slot, 0], edges[slot, 1:] = r, rows[r - self.r0].double()
        table = torch.cat(all_gather_(edges, self.group))  # (2 x ranks, 1 + width): row index (-1: none), sums
        for r in cut:  # the rows naming r, summed in order (a where, not a boolean index: no host synchronisation)
            mine = table[:, :1] == r
            rows[r - self.r0] = torch.where(mine, table[:, 1:], 0.0).sum(dim=0).to(rows.dtype)
        return rows

    def indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.arange(self.lo, self.hi, device=device)

    def block_ids(self, block_numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The block of each element when the flattening is cut into consecutive blocks of ``block_numel``."""
        return self.indices(device) // block_numel

    def block_sums(self, values: torch.Tensor, ids: torch.Tensor, blocks: int) -> torch.Tensor:
        """Per-block sums of ``values`` (one per fragment element) over every rank."""
        sums = values.new_zeros(blocks)
        sums.index_add_(0, ids, values)
        return self.all_reduce(sums)


ZeroLayout = dict[int, list[tuple[torch.nn.Parameter, FlatFragment]]]
"""For each flat fp32 partition ZeRO hands the optimizer (keyed by ``id``), the model parameters it holds pieces
of, in ZeRO's order (the same on every rank), each with this rank's :class:`FlatFragment`."""


# -- the protocol of shard-aware optimizers -----------------------------------------------------------------------

HOST_STATE_KEYS = frozenset({"step", "refreshes", "seed", "rounds", "proj_gap", "queue_len"})
"""Optimizer state kept on the host whatever device the parameter is on: 0-d counters the step reads into Python
each time (bias corrections, the refresh schedule, the seed of a random projection, the count of a bf16 weight's
stochastically rounded updates; Q-GaLore's current refresh gap and the length of its similarity queue). torch's
AdamW keeps its ``step`` there for the same reason: a host tensor is read without waiting for the device; a device
one would make every step wait, once per parameter. A checkpoint load puts them back there."""


def keeps_on_host(key: str, shape: torch.Size | tuple[int, ...], group: dict | None = None) -> bool:
    """State ``key`` of this ``shape`` is a host counter (:data:`HOST_STATE_KEYS`, 0-d); a fused or capturable torch
    optimizer's ``step`` lives on the device instead (its step reads it there). ``group``: the parameter's group."""
    if key not in HOST_STATE_KEYS or len(shape) != 0:
        return False
    return not (group and (group.get("fused") or group.get("capturable")))


class ShardAwareOptimizer:
    """What an optimizer declares about its state and the views it steps; the defaults are those of a plain
    element-wise optimizer (torch's AdamW), which is what :func:`optimizer_protocol` assumes for any optimizer that
    does not inherit this class.

    * :meth:`state_layout`: how a state tensor of a sharded parameter is laid out over the ranks, for checkpoints;
    * :meth:`attach_zero` / :attr:`zero_layout`: stepping DeepSpeed ZeRO's flat partitions as fragments of the
      model's parameters (state then kept per model parameter);
    * :meth:`restore_loaded_state`: fix-ups after a checkpoint load (memory layouts the arithmetic depends on);
    * :meth:`step_stats`: what the last step did, for the method to log;
    * :meth:`owner`: the optimizer that holds a parameter's state (per-layer updates wrap one per parameter);
    * :attr:`steps_in_backward`: the update happens inside backward (per-layer: :meth:`arm`, :meth:`disarm`), so
      ``step()`` does nothing; :meth:`release` when it is replaced.
    """

    steps_in_backward: bool = False
    zero_layout: ZeroLayout | None = None

    def state_layout(self, p: torch.Tensor, key: str) -> str | None:
        """``rows`` (this rank's rows of a row-sharded parameter, reshardable), ``replicated`` (whole on every
        rank), ``local`` (rank-specific but not by rows; reloads on as many ranks only), or None: a tensor shaped
        like the local shard is ``rows``, anything else ``replicated``."""
        return None

    def attach_zero(self, layout: ZeroLayout) -> None:
        """Run inside DeepSpeed ZeRO. Element-wise optimizers step ZeRO's flat partitions as they are."""

    def restore_loaded_state(self, p: torch.Tensor) -> None:
        """Called for each parameter whose state a checkpoint load put back."""

    def step_stats(self) -> dict[str, Any]:
        """Statistics of the last ``step()`` (e.g. GaLore: ``refreshes``, ``svd_seconds``, ``overlaps``,
        ``ef_residual_sq``); numbers add and lists concatenate when several optimizers report."""
        return {}

    def owner(self, p: torch.Tensor) -> Any:
        """The optimizer whose ``state[p]`` holds ``p``'s state."""
        return self

    def arm(self, *, clip_coef: float = 1.0) -> None:
        """``steps_in_backward`` optimizers: step each parameter in the coming backward, its gradient scaled by
        ``clip_coef``."""

    def disarm(self) -> torch.Tensor:
        """``steps_in_backward`` optimizers: end the step; returns the gradient norm of what was stepped."""
        raise NotImplementedError(f"{type(self).__name__} steps outside backward")

    def release(self) -> None:
        """The optimizer is being replaced (per-layer updates remove their backward hooks)."""


class _PlainOptimizer(ShardAwareOptimizer):
    """The protocol's defaults for an optimizer that does not declare it."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def owner(self, p: torch.Tensor) -> Any:
        return self.optimizer


def optimizer_protocol(optimizer: Any) -> ShardAwareOptimizer:
    """``optimizer`` itself when it declares :class:`ShardAwareOptimizer`, else the protocol's defaults for it."""
    return optimizer if isinstance(optimizer, ShardAwareOptimizer) else _PlainOptimizer(optimizer)


def merge_step_stats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers added, lists concatenated, over several optimizers' :meth:`ShardAwareOptimizer.step_stats`."""
    out: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, list):
                out[key] = [*out.get(key, []), *value]
            else:
                out[key] = out.get(key, 0) + value
    return out
