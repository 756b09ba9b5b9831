"""Plan a run's memory before booking GPUs: the bytes each rank holds (weights, gradients, optimizer state,
activations, temporaries), the peak and the phase it falls in, from the real trainer run on fake tensors (nothing
is allocated; no GPU and no data needed). With --gpu-memory: whether it fits one GPU of that size, and the largest
micro-batch that does.

  megatron-pept-plan --config quickstart model.name=7b method.name=galore_8bit optim.per_layer=true \\
      train.param_dtype=bf16 train.activation_checkpointing=true --gpu-memory 24
  megatron-pept-plan --config full_1b --ranks 8 parallel.backend=fsdp2 --gpu-memory 80 --json
  (python tools/plan.py ... in a checkout)

The config and key=value overrides are those of training (the same errors, exit 2). A run planned for CUDA
(train.device auto or cuda) is planned as it computes there; train.device=cpu plans a CPU run. --ranks N plans
one of N data-parallel ranks: fsdp2 on a fake process group; ddp and deepspeed (ZeRO-1/2/3) computed from a
one-process plan, as the output says. Exit codes: 0 planned (and fits, with --gpu-memory), 1 does not fit, 2 bad
input. How it works and how well it agrees with measured peaks: docs/benchmarks.md, "Memory planner".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_pept.cli import run_cli

PROG = "megatron-pept-plan"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a config file, or the name of one in configs/")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for training")
    parser.add_argument("--ranks", type=int, default=1, help="data-parallel ranks to plan one of (default 1)")
    parser.add_argument(
        "--gpu-memory", type=float, metavar="GB", help="a GPU's memory in GB (GiB): say whether the run fits it"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_intermixed_args(argv)

    def run() -> int:
        import logging

        from megatron_pept import registry
        from megatron_pept.errors import ConfigError
        from megatron_pept.plan import plan
        from megatron_pept.plan.fit import allowance_bytes, fits, largest_micro_batch

        logging.getLogger("megatron_pept").setLevel(logging.WARNING)  # the trainer's start-up lines
        if args.gpu_memory is not None and args.gpu_memory <= 0:
            raise ConfigError(f"--gpu-memory must be > 0 GB; got {args.gpu_memory}")
        cfg = registry.load_config(args.config, args.overrides)
        result = plan(cfg, ranks=args.ranks)
        fit: dict[str, Any] | None = None
        if args.gpu_memory is not None:
            search = largest_micro_batch(
                cfg, ranks=args.ranks, gpu_gb=args.gpu_memory, plan_fn=lambda c: plan(c, ranks=args.ranks), first=result
            )
            fit = {
                "gpu_memory_gb": args.gpu_memory,
                "fits": fits(result, args.gpu_memory),
                "allowance_gb": allowance_bytes(result) / 2**30,
                "needs_gb": (result.peak_bytes + allowance_bytes(result)) / 2**30,
                "largest_micro_batch": search.micro_batch_size,
                "largest_micro_batch_peak_gb": search.plan.peak_gb if search.plan else None,
                "planned_micro_batches_gb": {str(k): v / 2**30 for k, v in sorted(search.tried.items())},
            }
        if args.json:
            print(json.dumps({**result.as_dict(), "fit": fit}, indent=2))
        else:
            print(format_plan(result, fit))
        return 0 if fit is None or fit["fits"] else 1

    return run_cli(run, prog=prog)


def format_plan(result: Any, fit: dict[str, Any] | None = None) -> str:
    from megatron_pept.plan.planner import GIB, PART_NAMES

    s = result.settings
    extras = [
        f"weights {s['param_dtype']}",
        f"compute {s['compute_dtype']}",
        *(["per-layer updates"] if s["per_layer"] else []),
        *(["activation checkpointing"] if s["activation_checkpointing"] else []),
    ]
    backend = s["backend"] + (f" ZeRO-{s['zero_stage']}" if s.get("zero_stage") else "")
    lines = [
        f"{s['model']} ({result.params / 1e6:,.1f}M parameters, {result.trainable_params / 1e6:,.1f}M trained), "
        f"{s['method']}, {backend}, {s['ranks']} rank(s), micro-batch {s['micro_batch_size']} x {s['seq_len']} "
        f"tokens x {s['grad_accum_steps']} accumulation step(s), {', '.join(extras)}; planned for {s['device']}",
        f"how: {result.how} ({result.seconds:.0f} s)",
        f"per rank, at the peak, in {result.peak_phase}:",
    ]
    for name in PART_NAMES:
        most = result.largest[name] / GIB
        lines.append(f"  {name:<12} {result.parts[name] / GIB:9.3f} GB   (largest at any phase's peak {most:.3f})")
    lines.append(f"  {'peak':<12} {result.peak_gb:9.3f} GB")
    lines.append("peak of each phase:")
    for p in result.phase_peaks().values():
        lines.append(f"  {p.label:<36} {p.peak_bytes / GIB:9.3f} GB")
    if result.overrides:
        lines.append(f"planned with {', '.join(result.overrides)} (the method's events within the planned steps)")
    lines.extend(f"note: {n}" for n in result.notes)
    if fit is not None:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        lines.append(
            f"--gpu-memory {fit['gpu_memory_gb']:g}: {verdict} ({result.peak_gb:.2f} GB planned + "
            f"{fit['allowance_gb']:.2f} GB allowance for the CUDA context, allocator and communication = "
            f"{fit['needs_gb']:.2f} GB)"
        )
        mb = fit["largest_micro_batch"]
        lines.append(
            f"largest micro-batch that fits: {mb}"
            + (f" ({fit['largest_micro_batch_peak_gb']:.2f} GB planned)" if mb else " (none: not even 1)")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
