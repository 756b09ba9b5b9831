"""Q-GaLore's pure functions: group-wise min-max quantisation (int8 weights, int4 projectors), stochastic rounding
into the codes, int4 packing, and the adaptive projector-refresh rule.

Group quantisation (q-galore-torch 1.0's ``_quantize``, asymmetric, ``bits`` wide): the tensor, flattened row-major,
is cut into groups of ``group_size`` elements; each group has

* ``scale = max(max - min, 1e-5) / (2**bits - 1)`` and ``zero = clamp(-round(min / scale), 0, 2**bits - 1)``;
* codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` (unsigned), and ``w ~ (q - zero) * scale``.

The issue asked for "absmax" groups; q-galore-torch (projector and int8 weights alike) uses this min-max form with
a zero point, and we follow it so that the comparison with its simulation is bit for bit. Zero points are integers in
``[0, 2**bits - 1]``, so they are stored as ``uint8`` (exactly); scales are fp32.

Stochastic rounding (the int8 weights' update): ``x = w / scale``; ``q = ceil(x)`` where ``u < x - floor(x)``, else
``floor(x)``, for ``u`` uniform in ``[0, 1)``; then ``clamp(q + zero, 0, 255)``. Given the same ``u`` this is
q-galore-torch's ``_quantize_stochastic_round`` bit for bit; where ``u`` comes from is the caller's business (our
optimizer draws it from a counter-based seed per parameter, step and block of rows: see
:func:`rounding_noise`).

The adaptive refresh (the Q-GaLore paper's lazy layer-wise subspace exploration): at each refresh the cosine
similarity between the first singular vector of the new projector and of the previous one is pushed into a queue of
the last ``queue_size``; once the queue is full and its mean is at least ``cos_threshold``, the gap is multiplied by
``gamma`` (:func:`next_gap`). A refresh happens at steps where ``step % gap == 0`` with the *current* gap, as
q-galore-torch tests it.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch._guards import active_fake_mode


def _max_code(bits: int) -> int:
    return 2**bits - 1


def check_groups(shape: tuple[int, ...] | torch.Size, group_size: int) -> None:
    """Raise ValueError unless ``group_size`` divides the tensor into whole groups."""
    numel = math.prod(shape)
    if group_size <= 0 or numel % group_size:
        raise ValueError(
            f"a tensor of shape {tuple(shape)} ({numel} elements) is no whole number of {group_size}-groups"
        )


@torch.no_grad()
def group_scales(w: torch.Tensor, *, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(groups, scales, zeros)``: ``w`` as ``G x group_size`` (fp32) and each group's scale (``G x 1`` fp32) and zero
    point (``G x 1``, fp32 holding integers), computed as q-galore-torch computes them."""
    check_groups(w.shape, group_size)
    groups = w.float().reshape(-1, group_size)
    max_val = groups.amax(dim=1, keepdim=True)
    min_val = groups.amin(dim=1, keepdim=True)
    top = _max_code(bits)
    scales = (max_val - min_val).clamp(min=1e-5) / top
    zeros = (-torch.round(min_val / scales)).clamp_(0, top)
    return groups, scales, zeros


@torch.no_grad()
def quantize_groups(
    w: torch.Tensor, *, group_size: int, bits: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scales, zeros)`` of ``w``: codes ``uint8`` of ``w``'s shape, scales fp32 ``G x 1``, zero points
    ``uint8`` ``G x 1``. ``noise`` (uniform ``[0, 1)``, ``G x group_size`` or ``w``'s shape): stochastic rounding;
    None: round to the nearest (ties to even, as ``torch.round``)."""
    groups, scales, zeros = group_scales(w, group_size=group_size, bits=bits)
    x = groups / scales
    if noise is None:
        q = torch.round(x)
    else:
        down = torch.floor(x)
        q = torch.where(noise.reshape(x.shape) < (x - down), torch.ceil(x), down)
    codes = torch.clamp(q + zeros, 0, _max_code(bits))
    return codes.to(torch.uint8).reshape(w.shape), scales, zeros.to(torch.uint8)


def dequantize_groups(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, group_size: int
) -> torch.Tensor:
    """The fp32 tensor (of ``codes``' shape) that ``codes`` with ``scales`` and ``zeros`` (``G x 1``) encode:
    ``(q - zero) * scale``."""
    groups = codes.reshape(-1, group_size).float()
    return ((groups - zeros.reshape(-1, 1).float()) * scales.reshape(-1, 1)).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (``uint8`` values in ``[0, 15]``) a byte, the first in the high nibble; ``codes.numel()``
    must be even. Returns a flat ``uint8`` tensor of half the elements."""
    flat = codes.reshape(-1)
    return flat[0::2] << 4 | flat[1::2]


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: ``uint8`` codes of ``shape``."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(shape)


def next_gap(gap: int, queue: list[float], *, queue_size: int, cos_threshold: float, gamma: float) -> int:
    """The refresh gap after a refresh whose similarities so far are ``queue`` (newest last, at most ``queue_size``
    kept): ``int(gap * gamma)`` once the queue is full and its mean (summed left to right, as Python's ``sum``) is
    at least ``cos_threshold``; else ``gap``."""
    if len(queue) == queue_size and sum(queue) / queue_size >= cos_threshold:
        return int(gap * gamma)
    return gap


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


NOISE_ROWS = 64
"""Rows of a weight drawn from one generator seed for stochastic rounding: the draws of a row depend only on the
parameter's seed, the step and the row's block, never on which rank holds the row (FSDP2 shards by rows)."""


def rounding_noise(
    seed: int, step: int, *, rows: tuple[int, int], cols: int, device: torch.device | str
) -> torch.Tensor:
    """Uniform ``[0, 1)`` fp32 draws for rows ``[start, stop)`` of a weight with ``cols`` columns at optimizer step
    ``step``: each block of :data:`NOISE_ROWS` rows from its own generator, seeded from ``(seed, step, block)``, on
    ``device`` (no host-to-device copy). The same rows get the same draws on any number of ranks."""
    start, stop = rows
    if stop <= start:
        return torch.empty((0, cols), device=device)
    first, last = start // NOISE_ROWS, (stop - 1) // NOISE_ROWS
    if active_fake_mode() is not None:  # the memory planner: the same bytes (the blocks, then their copy), no values
        span = torch.rand(((last - first + 1) * NOISE_ROWS, cols), device=device)
        noise = span.clone() if last > first else span
        offset = start - first * NOISE_ROWS
        return noise[offset : offset + stop - start]
    blocks = []
    for block in range(first, last + 1):
        gen = torch.Generator(device=device).manual_seed(_hash63(f"{seed}/{step}/{block}"))
        height = NOISE_ROWS
        blocks.append(torch.rand((height, cols), generator=gen, device=device))
    noise = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    offset = start - first * NOISE_ROWS
    return noise[offset : offset + stop - start]
