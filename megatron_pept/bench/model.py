"""Training-throughput benchmark: our LLaMA against transformers' ``LlamaForCausalLM`` of the same shape.

Both models run in one process on one device with the same weights (ours are initialised, then loaded into
the transformers model with ``load_state_dict``) and the same random batch. One iteration is forward, the
trainer's next-token cross-entropy (:func:`megatron_pept.models.loss.cross_entropy_loss`, applied to both models'
logits so the loss math is identical; transformers' ``labels`` path is not used) and backward; gradients are
reset with ``set_to_none`` between iterations and no optimizer step is taken. The timed iterations of the two
models alternate, round by round, with the order flipped every round, and the median per-iteration time of
each is reported: on a shared machine the noise then falls on both alike.

transformers runs with ``attn_implementation="sdpa"`` by default (the same ``scaled_dot_product_attention``
kernel, called with ``is_causal=True`` and no mask, that our ``model.attention=sdpa`` uses) and
``use_cache=False`` (no KV cache is built during training), i.e. its fastest stock training configuration;
``hf_attn="eager"`` measures its plain-matmul attention instead.

Before timing, an fp32 correctness check runs both models on the batch and records the largest absolute
difference of their logits, of their losses and of their gradients, so a throughput ratio is only ever quoted
next to the proof that the two models compute the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megatron_pept.config import ModelConfig
from megatron_pept.errors import ConfigError, UserError
from megatron_pept.models import MODEL_SHAPES, build_model, llama_args
from megatron_pept.models.hf import to_hf_model
from megatron_pept.models.llama import LlamaArgs, LlamaForCausalLM
from megatron_pept.models.loss import cross_entropy_loss

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
HF_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class BenchSettings:
    """What to benchmark and how; every field is a command-line option of ``tools/bench.py``."""

    model: str = "60m"
    vocab_size: int = 32000
    seq_len: int = 256
    batch_size: int = 4
    warmup: int = 2
    rounds: int = 5
    device: str = "auto"
    dtype: str = "auto"
    hf_attn: str = "sdpa"
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line, with the fix) for a setting that cannot run."""
        if self.model not in MODEL_SHAPES:
            raise ConfigError(f"unknown --model '{self.model}'; choose one of {', '.join(MODEL_SHAPES)}")
        for name, minimum in (
            ("vocab_size", 2),
            ("seq_len", 1),
            ("batch_size", 1),
            ("warmup", 0),
            ("rounds", 1),
        ):
            if getattr(self, name) < minimum:
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{option} must be at least {minimum}, got {getattr(self, name)}")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("hf_attn", HF_ATTENTION)):
            if getattr(self, name) not in allowed:
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"unknown {option} '{getattr(self, name)}'; choose one of {', '.join(allowed)}")


@dataclass
class ModelTimings:
    """Per-iteration wall-clock seconds of one model's timed iterations."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class BenchResult:
    """Settings, environment, correctness check and throughput of one benchmark run."""

    settings: BenchSettings
    device: str
    dtype: str
    threads: int
    num_params: int
    tokens_per_iter: int
    torch_version: str
    transformers_version: str
    logits_max_abs_diff: float
    loss_abs_diff: float
    grad_max_abs_diff: float
    ours: ModelTimings
    hf: ModelTimings

    @property
    def ours_tokens_per_s(self) -> float:
        return self.tokens_per_iter / self.ours.median_s

    @property
    def hf_tokens_per_s(self) -> float:
        return self.tokens_per_iter / self.hf.median_s

    @property
    def speedup(self) -> float:
        """Ours / transformers in tokens per second: above 1 means ours is faster."""
        return self.ours_tokens_per_s / self.hf_tokens_per_s

    @property
    def paired_speedups(self) -> list[float]:
        """Ours / transformers in tokens per second for each round's adjacent pair of iterations.

        Their median is less sensitive than :attr:`speedup` to load that drifts over the run, since both
        iterations of a pair see nearly the same machine; their spread shows how noisy the machine was.
        """
        return [hf_s / ours_s for ours_s, hf_s in zip(self.ours.seconds, self.hf.seconds, strict=True)]

    @property
    def paired_speedup(self) -> float:
        return statistics.median(self.paired_speedups)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record, with the derived throughputs included."""
        record = dataclasses.asdict(self)
        record.update(
            ours_median_s=self.ours.median_s,
            hf_median_s=self.hf.median_s,
            ours_tokens_per_s=self.ours_tokens_per_s,
            hf_tokens_per_s=self.hf_tokens_per_s,
            speedup=self.speedup,
            paired_speedups=self.paired_speedups,
            paired_speedup=self.paired_speedup,
        )
        return record


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible; asking for CUDA without one is a :class:`ConfigError`."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str, *, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 autocast on CUDA and fp32 on CPU, as in training."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def build_ours(args: LlamaArgs, *, device: torch.device, seed: int) -> LlamaForCausalLM:
    """Our model the way training builds it: on meta, materialised on ``device``, seeded init, train mode."""
    model = build_model(args)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model.train()


def _import_transformers() -> Any:
    # Imported on use: transformers is a dev dependency, and its import is slow (it pulls in torchao ...).
    try:
        import transformers
    except ImportError:
        raise UserError(
            "the benchmark compares against transformers, which is not installed; pip install 'megatron_pept[hf]'"
        ) from None
    return transformers


def build_hf_twin(model: LlamaForCausalLM, *, attn_implementation: str) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` of the same shape holding a copy of ``model``'s weights."""
    _import_transformers()  # the benchmark's own message when transformers is missing
    hf = to_hf_model(model, attn_implementation=attn_implementation)
    assert hf.config._attn_implementation == attn_implementation, hf.config._attn_implementation
    return hf.train()


def random_batch(
    *, vocab_size: int, batch_size: int, seq_len: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``[batch, seq_len]`` from random windows of ``seq_len + 1`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
    return window[:, :-1].to(device), window[:, 1:].to(device)


def logits_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable mapping input ids to logits for either model (transformers' returns an output object)."""
    if isinstance(model, LlamaForCausalLM):
        return model
    return lambda input_ids: model(input_ids).logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_iteration(
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """One forward + loss + backward; returns the detached loss."""
    with autocast():
        loss = cross_entropy_loss(forward(inputs), targets)
    loss.backward()
    return loss.detach()


def timed_iteration(
    model: nn.Module,
    *,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype,
) -> float:
    """Wall-clock seconds of one training iteration of ``model`` (gradients reset beforehand, untimed)."""
    model.zero_grad(set_to_none=True)
    device = inputs.device
    forward = logits_fn(model)
    _sync(device)
    start = time.perf_counter()
    train_iteration(forward, inputs=inputs, targets=targets, autocast=lambda: _autocast(device, dtype))
    _sync(device)
    return time.perf_counter() - start


def check_equivalence(
    ours: LlamaForCausalLM, hf: nn.Module, *, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, float]:
    """Largest absolute differences of logits, loss and gradients of the two models on one batch, in fp32."""
    with torch.no_grad():
        logits_diff = (ours(inputs) - hf(inputs).logits).abs().max().item()
    losses = []
    for model in (ours, hf):
        model.zero_grad(set_to_none=True)
        losses.append(
            train_iteration(logits_fn(model), inputs=inputs, targets=targets, autocast=contextlib.nullcontext)
        )
    hf_params = dict(hf.named_parameters())
    grad_diff = max((p.grad - hf_params[name].grad).abs().max().item() for name, p in ours.named_parameters())
    for model in (ours, hf):
        model.zero_grad(set_to_none=True)
    return {
        "logits_max_abs_diff": logits_diff,
        "loss_abs_diff": (losses[0] - losses[1]).abs().item(),
        "grad_max_abs_diff": grad_diff,
    }


def interleaved_timings(
    models: dict[str, nn.Module],
    *,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype,
    warmup: int,
    rounds: int,
) -> dict[str, ModelTimings]:
    """Warm each model up, then time one iteration of each per round, reversing the order every round."""
    for model in models.values():
        for _ in range(warmup):
            timed_iteration(model, inputs=inputs, targets=targets, dtype=dtype)
    timings = {name: ModelTimings() for name in models}
    names = list(models)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            seconds = timed_iteration(models[name], inputs=inputs, targets=targets, dtype=dtype)
            timings[name].seconds.append(seconds)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return timings


def run_benchmark(settings: BenchSettings) -> BenchResult:
    """Build both models, check they agree, time them interleaved and return the result.

    Raises :class:`ConfigError` for settings that cannot run (unknown model, CUDA missing, ...).
    """
    settings.validate()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device=device)
    args = llama_args(ModelConfig(name=settings.model), vocab_size=settings.vocab_size, max_seq_len=settings.seq_len)
    ours = build_ours(args, device=device, seed=settings.seed)
    hf = build_hf_twin(ours, attn_implementation=settings.hf_attn)
    inputs, targets = random_batch(
        vocab_size=args.vocab_size,
        batch_size=settings.batch_size,
        seq_len=settings.seq_len,
        device=device,
        seed=settings.seed + 1,
    )
    check = check_equivalence(ours, hf, inputs=inputs, targets=targets)
    timings = interleaved_timings(
        {"ours": ours, "hf": hf},
        inputs=inputs,
        targets=targets,
        dtype=dtype,
        warmup=settings.warmup,
        rounds=settings.rounds,
    )
    return BenchResult(
        settings=settings,
        device=_describe_device(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        num_params=args.num_params(),
        tokens_per_iter=settings.batch_size * settings.seq_len,
        torch_version=torch.__version__,
        transformers_version=_import_transformers().__version__,
        ours=timings["ours"],
        hf=timings["hf"],
        **check,
    )


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def format_result(result: BenchResult) -> str:
    """A human-readable table of one benchmark result."""
    s = result.settings
    ours, hf, pairs = result.ours.seconds, result.hf.seconds, result.paired_speedups
    rows = [
        ("model", f"{s.model} ({result.num_params / 1e6:.1f}M params, vocab {s.vocab_size})"),
        ("batch x seq", f"{s.batch_size} x {s.seq_len} = {result.tokens_per_iter} tokens/iter"),
        ("device / dtype", f"{result.device} / {result.dtype}"),
        ("threads", str(result.threads)),
        ("versions", f"torch {result.torch_version}, transformers {result.transformers_version}"),
        ("iterations", f"{s.warmup} warm-up + {s.rounds} timed each, interleaved"),
        ("hf attention", s.hf_attn),
        ("logits max |diff|", f"{result.logits_max_abs_diff:.2e} (fp32)"),
        ("loss |diff|", f"{result.loss_abs_diff:.2e}"),
        ("grad max |diff|", f"{result.grad_max_abs_diff:.2e}"),
        ("ours s/iter", f"median {result.ours.median_s:.4f} (min {min(ours):.4f}, max {max(ours):.4f})"),
        ("hf   s/iter", f"median {result.hf.median_s:.4f} (min {min(hf):.4f}, max {max(hf):.4f})"),
        ("ours tokens/s", f"{result.ours_tokens_per_s:,.0f}"),
        ("hf   tokens/s", f"{result.hf_tokens_per_s:,.0f}"),
        ("ours / hf", f"{result.speedup:.3f}x (>1: ours faster)"),
        (
            "ours / hf, paired",
            f"median {result.paired_speedup:.3f}x over rounds (min {min(pairs):.3f}, max {max(pairs):.3f})",
        ),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


__all__ = [
    "BenchResult",
    "BenchSettings",
    "ModelTimings",
    "build_hf_twin",
    "build_ours",
    "check_equivalence",
    "format_result",
    "interleaved_timings",
    "random_batch",
    "run_benchmark",
    "timed_iteration",
]
