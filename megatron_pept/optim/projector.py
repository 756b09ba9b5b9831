"""GaLore's gradient projection as pure functions: which side to project, the top singular subspace (full SVD or a
randomized range finder), projecting and projecting back, the refresh schedule, and subspace statistics.

Shapes. A gradient ``G`` is ``m x n`` (``out x in`` for a linear weight). The projection keeps the *larger*
dimension and compresses the smaller one to ``r`` (GaLore's rule, galore-torch's ``proj_type="std"``):

* ``m >= n`` (tall or square): **right** projection, ``R = G P^T`` with ``P: r x n`` (the top right singular
  vectors); ``R`` is ``m x r``; back: ``R P``.
* ``m < n`` (wide): **left** projection, ``R = P^T G`` with ``P: m x r`` (the top left singular vectors); ``R`` is
  ``r x n``; back: ``P R``.

So the projector costs ``min(m, n) * r`` and the optimizer state ``max(m, n) * r``, the smaller of the two
layouts' projector, and for a weight sharded by rows (FSDP2, dim 0) the common tall/square case projects on the
right, which is local to each row shard.

APOLLO's projector is not a subspace of the gradient but a Gaussian matrix with entries of variance ``1 / r``
(:func:`random_projection`), the same shapes and sides. It is a pure function of an integer seed, and the seed of
each refresh a pure function of the parameter's name and the refresh count (:func:`name_seed`,
:func:`projection_seed`), so every process regenerates it, without communication, from two numbers.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

SIDES = ("left", "right")


def projection_side(shape: torch.Size | tuple[int, ...]) -> str:
    m, n = shape[0], shape[1]
    return "right" if m >= n else "left"


def projected_shape(shape: tuple[int, int], *, rank: int) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if projection_side(shape) == "right" else (rank, n)


def projector_shape(shape: tuple[int, int], *, rank: int) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if projection_side(shape) == "right" else (m, rank)


@torch.no_grad()
def svd_basis(grad: torch.Tensor, *, rank: int, side: str) -> torch.Tensor:
    """The top-``rank`` singular subspace of ``grad`` by a full SVD, in fp32 (right: ``r x n``; left: ``m x r``)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return column_major(vh[:rank] if side == "right" else u[:, :rank])


def column_major(basis: torch.Tensor) -> torch.Tensor:
    """A compact copy in the column-major layout LAPACK returns: slices of the SVD factors would keep the whole
    factor alive, and a row-major copy would change the matmul kernels (and results, in the last bit) compared
    with projecting through the slice itself, as galore-torch does."""
    return basis.T.clone(memory_format=torch.contiguous_format).T


@torch.no_grad()
def randomized_basis(
    grad: torch.Tensor,
    *,
    rank: int,
    side: str,
    generator: torch.Generator,
    oversample: int = 8,
    power_iters: int = 1,
) -> torch.Tensor:
    """The top-``rank`` singular subspace by a randomized range finder (Halko, Martinsson and Tropp 2011, with
    power iterations): sketch ``G`` with a Gaussian test matrix of ``rank + oversample`` columns drawn from
    ``generator``, orthonormalise, refine with ``power_iters`` passes of ``G G^T``, and take the top singular
    vectors of the small projected matrix. Costs O(m n (r + p)) instead of a full SVD's O(m n min(m, n))."""
    g = grad.float()
    if side == "right":
        g = g.T  # work on the side being compressed: columns of g live in the space we need a basis for
    m, n = g.shape
    k = min(rank + oversample, n, m)
    omega = torch.randn(n, k, generator=generator, device="cpu").to(g.device)
    q, _ = torch.linalg.qr(g @ omega)
    for _ in range(power_iters):
        # One orthonormalisation per iteration: enough in fp32 for the top of the spectrum, which is all we keep.
        q, _ = torch.linalg.qr(g @ (g.T @ q))
    u_small, _, _ = torch.linalg.svd(q.T @ g, full_matrices=False)
    basis = (q @ u_small[:, :rank]).contiguous()  # m x r (of g)
    return basis.T.contiguous() if side == "right" else basis


def _hash63(text: str) -> int:
    """A non-negative 63-bit integer from ``text``, the same in every process and Python version (unlike
    ``hash``, which is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def name_seed(name: str, *, base_seed: int = 0) -> int:
    """The seed of a parameter's random projections: from its name (``model.layers.0.mlp.up_proj.weight``) and
    the run's seed, so it does not depend on the parameter's place in a list (which changes with sharding, frozen
    parameters or per-layer optimizers)."""
    return _hash63(f"{base_seed}/{name}")


def projection_seed(seed: int, refresh: int) -> int:
    """The generator seed of refresh number ``refresh`` (0-based) of the parameter whose seed is ``seed``."""
    return _hash63(f"{seed}/{refresh}")


@torch.no_grad()
def random_projection(shape: tuple[int, int], *, rank: int, side: str, seed: int) -> torch.Tensor:
    """APOLLO's projector for an ``m x n`` gradient: a Gaussian matrix with entries of variance ``1 / rank``,
    ``r x n`` for a right projection, ``m x r`` for a left one (the layouts of :func:`svd_basis`), fp32, drawn on
    the CPU from a generator seeded with ``seed`` (so it is the same on any device; move it afterwards). The draw
    is apollo-torch's (``torch.randn`` of that shape from a fresh generator, divided by ``sqrt(rank)``)."""
    m, n = shape
    size = (rank, n) if side == "right" else (m, rank)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(size, generator=generator, dtype=torch.float32) / math.sqrt(rank)


def project(grad: torch.Tensor, basis: torch.Tensor, *, side: str) -> torch.Tensor:
    return grad @ basis.T if side == "right" else basis.T @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, *, side: str) -> torch.Tensor:
    return low @ basis if side == "right" else basis @ low


def subspace_overlap(old: torch.Tensor, new: torch.Tensor, *, side: str) -> float:
    """``||P_old^T P_new||_F^2 / r``: 1 for the same subspace, about ``r / dim`` for unrelated ones."""
    if side == "right":
        old, new = old.T, new.T
    rank = old.shape[1]
    return float((old.T.float() @ new.float()).square().sum()) / rank


def subspace_overlap_tensor(old: torch.Tensor, new: torch.Tensor, *, side: str) -> torch.Tensor:
    """:func:`subspace_overlap` as a 0-d float64 tensor on the projectors' device, the same value, computed without
    reading anything on the host (the optimizer step keeps its statistics as tensors)."""
    if side == "right":
        old, new = old.T, new.T
    return divide_exactly((old.T.float() @ new.float()).square().sum().double(), old.shape[1])


def divide_exactly(t: torch.Tensor, n: int | float) -> torch.Tensor:
    """``t / n`` rounded as Python divides floats (IEEE division), on ``t``'s device without a host-to-device copy.
    A plain ``t / n`` on CUDA multiplies by ``1 / n`` instead (one bit of precision may be lost), so statistics
    kept as tensors would no longer equal the ones computed on the host."""
    return t / torch.full_like(t, n)


def captured_energy(grad: torch.Tensor, basis: torch.Tensor, *, side: str) -> float:
    """Share of the gradient's squared Frobenius norm inside the subspace."""
    g = grad.float()
    return float(project(g, basis.float(), side=side).square().sum() / g.square().sum().clamp_min(1e-30))


DYNAMIC_RULES = ("step", "gap")


@functools.lru_cache(maxsize=16)
def _dynamic_head(first: int, growth: float, cap: int, rule: str) -> tuple[frozenset[int], int]:
    """Dynamic refresh steps while the gap still grows, and the last of them (after it: every ``cap`` steps)."""
    steps, at = [0], min(first, cap)
    if rule == "gap":
        gap = at
        while gap < cap:
            steps.append(steps[-1] + gap)
            gap = min(cap, max(gap + 1, int(math.floor(gap * growth))))  # grows even from a gap of 1
        steps.append(steps[-1] + cap)
        return frozenset(steps), steps[-1]
    # rule == "step": the refresh step itself grows (kept unrounded, as the paper's float update_step is); a step
    # is at least one past the previous one, so a small `first` cannot repeat a step.
    exact = float(at)
    while at - steps[-1] < cap:
        steps.append(at)
        exact *= growth
        at = max(int(math.floor(exact)), at + 1)
    steps.append(steps[-1] + cap)
    return frozenset(steps), steps[-1]


@dataclass(frozen=True)
class RefreshSchedule:
    """When projectors are recomputed, as a pure function of the optimizer step (0-based).

    Fixed: every ``gap`` steps (0, gap, 2 gap, ...), as GaLore. Dynamic (GaLore-dynamic, Approximations paper
    section 4.2: "update_step = update_steps + 0.5 * update_steps", starting from step 200, the update frequency
    capped at 2500), at step 0 and ``first``, then by ``rule``:

    * ``step`` (default, the paper's reading): each refresh step is ``growth`` times the previous one (unrounded,
      floored when used), the gap capped at ``cap``: 0, 200, 300, 450, 675, 1012, 1518, 2278, 3417, 5125, 7625,
      then every 2500: 15 refreshes in 20k steps, the paper's "from 400 to 15".
    * ``gap``: each gap is ``growth`` times the previous one (rounded down), capped at ``cap``: 0, 200, 500, 950,
      1625, 2637, 4155, 6432, 8932, then every 2500 (13 in 20k steps; earlier versions of this project).
    """

    gap: int = 200
    dynamic: bool = False
    first: int = 200
    growth: float = 1.5
    cap: int = 2500
    rule: str = "step"

    def __post_init__(self) -> None:
        if self.rule not in DYNAMIC_RULES:
            raise ValueError(f"dynamic refresh rule must be one of {', '.join(DYNAMIC_RULES)}; got {self.rule!r}")

    def is_refresh(self, step: int) -> bool:
        if not self.dynamic:
            return step % self.gap == 0
        head, last = _dynamic_head(self.first, self.growth, self.cap, self.rule)
        return step in head or (step > last and (step - last) % self.cap == 0)

    def refresh_steps(self, total_steps: int) -> list[int]:
        return [s for s in range(total_steps) if self.is_refresh(s)]
