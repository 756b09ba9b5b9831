"""Benchmark CLI: training throughput of our LLaMA against transformers' LlamaForCausalLM of the same shape.

``megatron-pept-bench --model 60m`` (``python tools/bench.py`` in a checkout; ``--help`` for every option). The
measurement itself lives in :mod:`megatron_pept.bench`; this file only parses arguments, prints the table and
writes the optional JSON.
Mistakes in the input are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from megatron_pept.bench import DEVICES, DTYPES, HF_ATTENTION, BenchSettings, format_result, run_benchmark
from megatron_pept.bench.data import DataBenchSettings, format_data_result, run_data_benchmark
from megatron_pept.cli import run_cli
from megatron_pept.errors import UserError
from megatron_pept.models import MODEL_SHAPES

PROG = "megatron-pept-bench"


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (no usage dump) and exit code 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    defaults = BenchSettings()
    example = f"python {prog}" if prog.endswith(".py") else prog  # tools/bench.py runs under python
    parser = _OneLineParser(
        prog=prog,
        description=(
            "Measure forward+backward training throughput (tokens/s) of megatron_pept's LlamaForCausalLM "
            "and of transformers' LlamaForCausalLM of the same shape, in one process on one device, with the "
            "same weights (ours loaded into transformers' model) and the same random batch. The loss is the "
            "trainer's mean next-token cross-entropy, computed from each model's logits the same way "
            "(transformers' labels path is not used). Gradients are reset (set_to_none) between iterations; "
            "no optimizer step. After warm-up, the timed iterations of the two models alternate round by "
            "round (order flipped each round) and the median per-iteration time of each is reported, so "
            "machine noise hits both alike. transformers runs with attn_implementation=sdpa (the same torch "
            "kernel ours uses, is_causal=True, no mask) and use_cache=False. Before timing, an fp32 check "
            "reports the largest difference of the two models' logits, losses and gradients on the batch."
        ),
        epilog=f"Example: {example} --model 60m --threads 2 --json bench-60m.json",
    )
    parser.add_argument(
        "--suite",
        choices=(
            "model",
            "data",
            "optim",
            "comm",
            "grad_memory",
            "checkpoint",
            "quant",
            "quant_memory",
            "param_bytes",
            "planner",
        ),
        default="model",
        help="model (default): our LLaMA vs transformers' as described above; planner: the memory planner's peak "
        "beside the allocator's measured peak of the same run on this CPU, for each of its cases (--planner-cases); "
        "data: corpus preparation "
        "throughput (MB/s) and the loader's share of a debug-model training step (see --corpus-mb ...); optim: "
        "GaLore optimizer-state bytes, step time vs galore-torch, projector refresh (full vs randomized SVD), "
        "GaLore's overhead in a 60m training step, per-layer update memory, the family's (AdamW, galore, apollo, "
        "apollo_mini, fira) optimizer-state bytes and step time (see --optim-bench); comm: bytes "
        "communicated per step by 2 gloo ranks, each method against full on the same backend (see --comm-*); "
        "grad_memory: live gradient bytes per rank with and without per-layer updates under ddp and fsdp2; "
        "checkpoint: save (sync and async) and load times against torch.save (--comm-model sets the size); quant: "
        "bytes and requantisation drift of the quantised frozen-base formats; quant_memory: peak RSS, frozen-base "
        "bytes and step time of ReLoRA training per base (bf16, fp32, int8 and nf4 with and without the fp32 "
        "master), each in a fresh process, against bf16 (--model, --steps, --batch-size, --seq-len, --rank, "
        "--threads)",
    )
    parser.add_argument(
        "--optim-bench",
        default="state_bytes,step_time,refresh,overhead,per_layer_memory,family",
        help="optim suite: comma-separated measurements to run (default: all)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="optim and comm suites: GaLore rank (default 256); quant_memory: ReLoRA rank (default 128)",
    )
    parser.add_argument(
        "--optim-model", default="350m", choices=list(MODEL_SHAPES), help="optim suite: model shapes (default 350m)"
    )
    parser.add_argument("--blocks", type=int, default=2, help="optim suite: transformer blocks of matrices (default 2)")
    parser.add_argument(
        "--planner-cases",
        help="planner suite: comma-separated cases (default: all; names in megatron_pept.bench.planner)",
    )
    parser.add_argument("--comm-model", default="60m", choices=list(MODEL_SHAPES), help="comm suite: model size")
    parser.add_argument(
        "--comm-methods", default="full,galore", help="comm suite: comma-separated methods (full is the baseline)"
    )
    parser.add_argument(
        "--comm-overrides",
        default="",
        help="comm suite: comma-separated config overrides for every run (e.g. method.ns_dtype=fp32)",
    )
    parser.add_argument(
        "--comm-backends",
        default="fsdp2,deepspeed",
        help="comm suite: comma-separated backends (ddp, fsdp2, deepspeed)",
    )
    parser.add_argument("--zero-stage", type=int, default=2, help="comm suite: ZeRO stage for deepspeed (default 2)")
    data = DataBenchSettings()
    parser.add_argument("--corpus-mb", type=float, default=data.corpus_mb, help="data suite: MB of text to prepare")
    parser.add_argument(
        "--tokenizer-vocab", type=int, default=data.tokenizer_vocab, help="data suite: tokenizer vocabulary size"
    )
    parser.add_argument("--workers", type=int, default=data.workers, help="data suite: tokenizer processes")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"data suite: timed training steps (default {data.steps}); quant_memory: training steps per base, "
        "the first untimed (default 4)",
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        choices=list(MODEL_SHAPES),
        metavar="NAME",
        help=f"named model size, one of: {', '.join(MODEL_SHAPES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=defaults.vocab_size, help="vocabulary size (default: %(default)s)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="sequences per iteration (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        help="untimed iterations per model before timing (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="timed rounds; each round times one iteration of each model (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        choices=DEVICES,
        help="auto (default) picks CUDA when one is visible",
    )
    parser.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=DTYPES,
        help="fp32, or bf16 autocast over fp32 weights; auto (default): bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--hf-attn",
        default=defaults.hf_attn,
        choices=HF_ATTENTION,
        help="transformers' attention implementation: sdpa (torch scaled_dot_product_attention) or eager "
        "(plain matmul + softmax); default: %(default)s",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_threads(N) for the run (default: leave torch's setting as is)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the weights and the batch (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the result (settings, versions, checks, every timing) as JSON",
    )
    return parser


def _write_json(path: Path | None, result: Any) -> None:
    """``--json PATH``: the suite's result as JSON (its folder made); nothing without the flag."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.suite == "data":
        return run_cli(lambda: _data_suite(args), prog=prog)
    if args.suite == "optim":
        return run_cli(lambda: _optim_suite(args), prog=prog)
    if args.suite in ("comm", "grad_memory"):
        return run_cli(lambda: _comm_suite(args), prog=prog)
    if args.suite == "checkpoint":
        return run_cli(lambda: _checkpoint_suite(args), prog=prog)
    if args.suite == "quant":
        return run_cli(lambda: _quant_suite(args), prog=prog)
    if args.suite == "quant_memory":
        return run_cli(lambda: _quant_memory_suite(args), prog=prog)
    if args.suite == "param_bytes":
        return run_cli(lambda: _param_bytes_suite(args), prog=prog)
    if args.suite == "planner":
        return run_cli(lambda: _planner_suite(args), prog=prog)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        settings = BenchSettings(
            model=args.model,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            warmup=args.warmup,
            rounds=args.rounds,
            device=args.device,
            dtype=args.dtype,
            hf_attn=args.hf_attn,
            seed=args.seed,
        )
        settings.validate()  # before the slow transformers import, so mistakes are reported at once
        result = run_benchmark(settings)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(format_result(result))
    _write_json(args.json, result.to_dict())
    return 0


def _planner_suite(args: argparse.Namespace) -> int:
    from megatron_pept.bench import planner as bp

    cases = tuple(c.strip() for c in (args.planner_cases or ",".join(bp.CASES)).split(",") if c.strip())
    unknown = [c for c in cases if c not in bp.CASES]
    if unknown:
        raise UserError(f"--planner-cases: unknown {', '.join(unknown)}; choose from {', '.join(bp.CASES)}")
    result = bp.run_planner_check(bp.PlannerCheckSettings(cases=cases))
    print(bp.format_planner_check(result))
    _write_json(args.json, result)
    return 0


def _comm_suite(args: argparse.Namespace) -> int:
    from megatron_pept.bench import comm as bc

    methods = tuple(m.strip() for m in args.comm_methods.split(",") if m.strip())
    default_backends = "fsdp2,deepspeed" if args.suite == "comm" else "ddp,fsdp2"
    backends = tuple(b.strip() for b in (args.comm_backends or default_backends).split(",") if b.strip())
    allowed = ("ddp", "fsdp2", "deepspeed") if args.suite == "comm" else ("ddp", "fsdp2")
    bad = [b for b in backends if b not in allowed]
    if bad:
        raise UserError(
            f"--comm-backends {', '.join(bad)} not available for --suite {args.suite}; choose from {', '.join(allowed)}"
        )
    if args.suite == "comm":
        if "full" not in methods:
            methods = ("full", *methods)
        settings = bc.CommBenchSettings(
            model=args.comm_model,
            rank=_rank(args, 256),
            methods=methods,
            backends=backends,
            zero_stage=args.zero_stage,
            overrides=tuple(o.strip() for o in args.comm_overrides.split(",") if o.strip()),
        )
        result = bc.run_comm_benchmark(settings)
        print(bc.format_comm_result(result))
    else:
        grad = bc.GradMemorySettings(model=args.comm_model, rank=_rank(args, 256), methods=methods, backends=backends)
        result = bc.run_grad_memory_benchmark(grad)
        print(bc.format_grad_memory_result(result))
    _write_json(args.json, result)
    return 0


def _quant_suite(args: argparse.Namespace) -> int:
    """Frozen-base quantisation: bytes against fp32 and what requantising at every ReLoRA merge does (50 merges of
    updates 1e-3 and 1e-2 of the weight's norm, a 512 x 512 matrix)."""
    import torch

    from megatron_pept.quant import FORMATS, quantize, quantized_bytes, requantisation_drift

    weight = torch.randn(512, 512) * 0.02
    result: dict = {"bytes_vs_fp32": {}, "drift": {}}
    for fmt in FORMATS:
        result["bytes_vs_fp32"][fmt] = quantized_bytes(quantize(weight, fmt)) / (weight.numel() * 4)
        for scale in (1e-3, 1e-2):
            runs = requantisation_drift(fmt, restarts=50, update_scale=scale)
            result["drift"][f"{fmt}@{scale:g}"] = {
                name: {key: [round(v[0], 4), round(v[9], 4), round(v[-1], 4)] for key, v in curves.items()}
                for name, curves in runs.items()
            }
    print("values after merges 1, 10 and 50 (see megatron_pept.quant.requantisation_drift)", file=sys.stderr)
    print(json.dumps(result, indent=2))
    _write_json(args.json, result)
    return 0


def _rank(args: argparse.Namespace, default: int) -> int:
    return default if args.rank is None else args.rank


def _quant_memory_suite(args: argparse.Namespace) -> int:
    """Peak RSS, frozen-base bytes and step time of ReLoRA training per base storage (megatron_pept.bench.quant)."""
    from megatron_pept.bench.quant import (
        QuantMemorySettings,
        format_quant_memory_result,
        run_quant_memory_benchmark,
    )

    defaults = QuantMemorySettings()
    settings = QuantMemorySettings(
        model=args.model,
        steps=defaults.steps if args.steps is None else args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=_rank(args, defaults.rank),
        threads=args.threads,
    )
    result = run_quant_memory_benchmark(settings)
    print(format_quant_memory_result(result))
    _write_json(args.json, result)
    return 0


def _param_bytes_suite(args: argparse.Namespace) -> int:
    """Bytes held per model parameter by weight dtype, update rule and method (megatron_pept.bench.param_bytes)."""
    from megatron_pept.bench.param_bytes import ParamBytesSettings, format_param_bytes_result, run_param_bytes_benchmark

    result = run_param_bytes_benchmark(ParamBytesSettings(model=args.model, rank=_rank(args, 128)))
    print(format_param_bytes_result(result))
    _write_json(args.json, result)
    return 0


def _checkpoint_suite(args: argparse.Namespace) -> int:
    from megatron_pept.bench.checkpoint import CheckpointBenchSettings, run_checkpoint_benchmark

    result = run_checkpoint_benchmark(CheckpointBenchSettings(model=args.comm_model, rounds=args.rounds))
    print(json.dumps({k: v for k, v in result.items() if k != "all_s"}, indent=2))
    _write_json(args.json, result)
    return 0


def _optim_suite(args: argparse.Namespace) -> int:
    from megatron_pept.bench.optim import BENCHES, OptimBenchSettings, run_optim_benchmarks

    which = [name.strip() for name in args.optim_bench.split(",") if name.strip()]
    unknown = [name for name in which if name not in BENCHES]
    if unknown:
        raise UserError(f"unknown --optim-bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    settings = OptimBenchSettings(model=args.optim_model, rank=_rank(args, 256), blocks=args.blocks, rounds=args.rounds)
    result = run_optim_benchmarks(settings, which=which)
    print(json.dumps(result, indent=2))
    _write_json(args.json, result)
    return 0


def _data_suite(args: argparse.Namespace) -> int:
    result = run_data_benchmark(
        DataBenchSettings(
            corpus_mb=args.corpus_mb,
            tokenizer_vocab=args.tokenizer_vocab,
            workers=args.workers,
            steps=DataBenchSettings().steps if args.steps is None else args.steps,
        )
    )
    print(format_data_result(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
