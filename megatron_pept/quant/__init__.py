"""Low-precision storage of frozen base weights: quantise a dense fp32 matrix into plain tensors (state_dict and DCP
friendly, so checkpoints restore them bit for bit) and dequantise them back.

Formats:

* ``int8``: per-output-channel (row) absmax: ``scale_i = max_j |W_ij| / 127``, ``q = round(W / scale)`` in
  ``[-127, 127]``; error at most ``scale_i / 2`` per element; 1 byte per weight plus 4 per row.
* ``nf4``: QLoRA's 4-bit NormalFloat, blockwise (``block_size`` weights share an absmax), with the block scales
  double-quantised to int8 in groups of ``scaler_block_size`` (torchao's ``NF4Tensor``, the implementation
  torchtune's QLoRA uses, does both); about 0.52 bytes per weight. With ``double_quant=False`` the block absmaxes
  stay fp32 (parts ``q``, ``absmax``, ``codebook``): each weight maps to the nearest of torchao's 16 code values
  after dividing by its block's absmax, two codes per byte in torchao's nibble order (the first element in the high
  nibble), so ``q`` is byte for byte torchao's; error at most half the widest code gap (0.152) times the block
  absmax; ``0.5 + 4 / block_size`` bytes per weight (0.5625 for blocks of 64).
* ``fp8``: per-output-channel (row) absmax to ``torch.float8_e4m3fn``: ``scale_i = max_j |W_ij| / 448``,
  ``q = fp8(W / scale)``; error at most ``2^-4 |W_ij|`` (3 mantissa bits) plus ``2^-10 scale_i`` for the
  subnormals; 1 byte per weight plus 4 per row. Only the storage: quantising and dequantising (to the compute
  dtype) are plain casts that run on any device, CPU included; no fp8 arithmetic is involved (computing in fp8
  would need a GPU that has it: :func:`fp8_supported`).

``round="stochastic"`` (int8 only; nf4 and fp8 round to the nearest) rounds up or down with the probability of the
distance, so a requantised weight is unbiased: updates smaller than half a step survive in expectation instead of
being rounded away at every merge.
What requantisation does over many ReLoRA restarts is measured by :func:`requantisation_drift`
(``python tools/bench.py --suite quant``; docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import importlib

import torch

FORMATS = ("int8", "nf4", "fp8")
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_NF4_CHUNK = 1 << 18  # elements matched against the 16 codes at a time (16 fp32 distances each)


NF4_MODULES = (
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",  # torchao 0.18 and later
    "torchao.dtypes.nf4tensor",  # torchao 0.10 to 0.17 (the same NF4Tensor, to_nf4 and SubclassTensorArgs)
)
"""Where torchao keeps its NF4 tensor, newest first (it moved in torchao 0.18)."""


def _nf4_module():  # torchao (the quant extra) is imported when NF4 is used (it loads slowly)
    for name in NF4_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    from megatron_pept.errors import ConfigError

    raise ConfigError(
        "method.base_dtype=nf4 needs torchao 0.10 or later: pip install 'megatron_pept[quant]' (or pip install torchao)"
    )


@functools.cache
def _nf4_codes() -> torch.Tensor:
    """torchao's 16 NF4 code values (fp32, ascending), read off an NF4Tensor so they are the library's own."""
    return _nf4_module().to_nf4(torch.arange(128.0), block_size=64, scaler_block_size=2).nf4.float()


def _nf4_quantize(w: torch.Tensor, block_size: int) -> dict[str, torch.Tensor]:
    """NF4 with fp32 block absmaxes: nearest code per element, packed like torchao (see the module docstring)."""
    blocks = w.reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    x = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]).flatten()
    codebook = _nf4_codes().to(w.device, copy=True)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=w.device)
    for start in range(0, x.numel(), _NF4_CHUNK):  # the nearest code (argmin: ties to the lower one)
        chunk = x[start : start + _NF4_CHUNK]
        codes[start : start + _NF4_CHUNK] = (chunk[:, None] - codebook).abs().argmin(dim=1).to(torch.uint8)
    return {"q": codes[::2] << 4 | codes[1::2], "absmax": absmax, "codebook": codebook}


@torch.no_grad()
def quantize(
    weight: torch.Tensor,
    fmt: str,
    *,
    round: str = "nearest",
    generator: torch.Generator | None = None,
    block_size: int = NF4_BLOCK,
    scaler_block_size: int = NF4_SCALER_BLOCK,
    double_quant: bool = True,
) -> dict[str, torch.Tensor]:
    """The quantised form of the 2-D ``weight`` as named tensors (see the module docstring); ``double_quant``
    (nf4 only) says whether the block scales are themselves quantised."""
    if weight.dim() != 2:
        raise ValueError(f"only matrices are quantised; got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if fmt == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = w / scale
        if round == "stochastic":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            q = torch.floor(x + noise)
        elif round == "nearest":
            q = torch.round(x)
        else:
            raise ValueError(f"unknown rounding {round!r}; choose nearest or stochastic")
        return {"q": q.clamp_(-127, 127).to(torch.int8), "scale": scale.squeeze(1)}
    if fmt == "nf4":
        if round != "nearest":
            raise ValueError("nf4 rounds to the nearest code only")
        if w.numel() % block_size:
            raise ValueError(f"nf4 needs the weight's size ({w.numel()}) to divide into blocks of {block_size}")
        if not double_quant:
            if block_size % 2:
                raise ValueError(f"nf4 packs two codes a byte: the block size ({block_size}) must be even")
            return _nf4_quantize(w, block_size)
        scaler_block_size = scaler_group(w.numel() // block_size, scaler_block_size)
        t = _nf4_module().to_nf4(w.contiguous(), block_size=block_size, scaler_block_size=scaler_block_size)
        return {
            "q": t.quantized_data,
            "scalers": t.quantized_scalers,
            "factor": t.quantization_factor,
            "mean": t.scaler_mean.reshape(1),
            "codebook": t.nf4,
        }
    if fmt == "fp8":
        if round != "nearest":
            raise ValueError("fp8 rounds to the nearest value only")
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"q": q, "scale": scale.squeeze(1)}
    raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)}")


@torch.no_grad()
def dequantize(
    parts: dict[str, torch.Tensor],
    fmt: str,
    shape: tuple[int, int] | torch.Size,
    *,
    block_size: int = NF4_BLOCK,
    scaler_block_size: int = NF4_SCALER_BLOCK,
    double_quant: bool = True,
) -> torch.Tensor:
    """The fp32 matrix of ``shape`` that ``parts`` encode (``double_quant`` as they were quantised with)."""
    if fmt in ("int8", "fp8"):
        return parts["q"].float() * parts["scale"][:, None]
    if fmt == "nf4" and not double_quant:
        if "absmax" not in parts:
            raise ValueError("these nf4 parts have double-quantised scales; dequantise them with double_quant=True")
        q = parts["q"]
        codes = torch.stack([q >> 4, q & 0b1111], dim=-1).flatten().long()  # torchao's order: high nibble first
        values = parts["codebook"].float()[codes].view(-1, block_size) * parts["absmax"].float()[:, None]
        return values.view(torch.Size(shape))
    if fmt == "nf4":
        if "scalers" not in parts:
            raise ValueError("these nf4 parts have fp32 block scales; dequantise them with double_quant=False")
        nf4 = _nf4_module()
        shape = torch.Size(shape)
        scaler_block_size = shape.numel() // block_size // parts["factor"].numel()
        meta = nf4.SubclassTensorArgs(
            shape, torch.empty(shape, device="meta").stride(), 0, torch.float32, parts["q"].device, False
        )
        t = nf4.NF4Tensor(
            meta,
            block_size,
            shape.numel() // block_size,
            scaler_block_size,
            parts["scalers"],
            parts["factor"],
            parts["mean"].reshape(()),
            parts["q"],
            parts["codebook"],
        )
        return t.get_original_weight().float().view(shape)
    raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)}")


def fp8_supported(device: torch.device) -> str | None:
    """None when ``device`` can compute in fp8 (fp8 matrix multiplies: CUDA, compute capability 8.9 or later), else
    one line saying why not. fp8 *storage* (``method.base_dtype=fp8``) does not need it: it runs anywhere."""
    need = "fp8 compute needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 or later: Ada, Hopper)"
    device = torch.device(device)
    if device.type != "cuda":
        return f"{need}; this device is {device}"
    if not torch.cuda.is_available():
        return f"{need}; this device is {device} but CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 9):
        return None
    return f"{need}; this device is {device}, compute capability {major}.{minor}"


def scaler_group(n_blocks: int, largest: int = NF4_SCALER_BLOCK) -> int:
    """Blocks per group of double-quantised scales: ``largest``, or for a small matrix the largest divisor of its
    block count below it (torchao needs the groups to tile the blocks)."""
    return next(d for d in range(min(largest, n_blocks), 0, -1) if n_blocks % d == 0)


def part_shapes(
    fmt: str, shape: tuple[int, int] | torch.Size, *, block_size: int = NF4_BLOCK, double_quant: bool = True
) -> dict:
    """``name -> (shape, dtype)`` of the tensors :func:`quantize` returns for a ``shape`` matrix (to allocate them
    before the values exist, e.g. on the meta device or to load a checkpoint into)."""
    rows, cols = shape
    if fmt == "int8":
        return {"q": ((rows, cols), torch.int8), "scale": ((rows,), torch.float32)}
    if fmt == "fp8":
        return {"q": ((rows, cols), torch.float8_e4m3fn), "scale": ((rows,), torch.float32)}
    if fmt == "nf4" and not double_quant:
        return {
            "q": ((rows * cols // 2,), torch.uint8),
            "absmax": ((rows * cols // block_size,), torch.float32),
            "codebook": ((16,), torch.float32),
        }
    if fmt == "nf4":
        n_blocks = rows * cols // block_size
        return {
            "q": ((rows * cols // 2,), torch.uint8),
            "scalers": ((n_blocks,), torch.int8),
            "factor": ((n_blocks // scaler_group(n_blocks),), torch.float32),
            "mean": ((1,), torch.float32),
            "codebook": ((16,), torch.float32),
        }
    raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)}")


def quantized_bytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes the ``parts`` occupy: int8 and fp8 1 per weight plus 4 per row; nf4 about 0.52 per weight with
    double-quantised scales, ``0.5 + 4 / block_size`` (0.5625) with fp32 ones; plus 64 for nf4's codebook."""
    return sum(t.numel() * t.element_size() for t in parts.values())


@torch.no_grad()
def requantisation_drift(
    fmt: str,
    *,
    shape: tuple[int, int] = (512, 512),
    restarts: int = 50,
    update_scale: float = 1e-3,
    strategies: tuple[str, ...] = ("nearest", "stochastic", "carry", "master"),
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """What requantising the base at every ReLoRA merge does to the training merged into it.

    A weight ``W0`` (init-like scale) gets, at each of ``restarts`` merges, a rank-8 update ``dW_k`` of Frobenius
    norm ``update_scale * ||W0||``; the exact base is ``W_k = W0 + sum dW``. Each strategy keeps only the
    quantised base and requantises at every merge: ``nearest``; ``stochastic`` (int8 only, skipped for nf4 and fp8,
    which round to the nearest: unbiased rounding, no extra memory); ``carry`` (what the last requantisation lost is
    added into the next merge: a full-size fp32 residual); ``master`` (an exact fp32 master is merged into and
    quantised afresh each time: a full-size fp32 copy, which can live in host memory while the device holds only the
    quantised base). Per strategy and restart:

    * ``lost``: ``||(deq(Q_k) - deq(Q_0)) - (W_k - W0)|| / ||W_k - W0||``, the share of everything merged so far
      that the stored base does not hold (1.0: the updates vanished or were replaced by noise of their size);
    * ``error``: ``||deq(Q_k) - W_k|| / ||W0||``, the stored base's whole error (the first quantisation included).
    """
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen) * 0.02
    updates = []
    for _ in range(restarts):
        d = torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen)
        updates.append(d * (update_scale * w0.norm() / d.norm()))
    out: dict[str, dict[str, list[float]]] = {}
    for strategy in strategies:
        if strategy == "stochastic" and fmt != "int8":
            continue
        rounding = "stochastic" if strategy == "stochastic" else "nearest"
        sr = torch.Generator().manual_seed(seed + 1)
        parts = quantize(w0, fmt, round=rounding, generator=sr)
        start = dequantize(parts, fmt, shape)
        exact, residual = w0.clone(), torch.zeros(shape)
        lost, error = [], []
        for d in updates:
            exact += d
            merged = exact.clone() if strategy == "master" else dequantize(parts, fmt, shape) + d
            if strategy == "carry":
                merged += residual
            parts = quantize(merged, fmt, round=rounding, generator=sr)
            stored = dequantize(parts, fmt, shape)
            if strategy == "carry":
                residual = merged - stored
            lost.append(float(((stored - start) - (exact - w0)).norm() / (exact - w0).norm()))
            error.append(float((stored - exact).norm() / w0.norm()))
        out[strategy] = {"lost": lost, "error": error}
    return out
