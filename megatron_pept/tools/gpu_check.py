"""GPU acceptance check CLI: ``python tools/gpu_check.py --json gpu_check.json`` (``--help`` for every option).

The measurements live in :mod:`megatron_pept.bench.gpu_check`; this file parses arguments, prints the one table
(stdout; progress goes to stderr) and writes the optional JSON. Exit status: 0 when no row FAILs (SKIP rows do not
fail), 1 when a measured row misses its target or errors, 2 for a mistake in the arguments or when the real check
cannot run: without a CUDA device it prints one line on stderr, writes nothing and exits 2 (a GPU job that lost its
GPU must not pass). ``--dry-run`` runs the same code on CPU with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

PROG = "gpu_check"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from megatron_pept.bench.gpu_check import CHECK_GROUPS, GpuCheckSettings

    real = GpuCheckSettings()
    parser = _OneLineParser(
        prog=prog,
        description=(
            "GPU acceptance check on one CUDA device (sized to finish in under 8 minutes on an H100/H200): "
            f"bf16 tokens/s and MFU of the {real.model} model for full, galore and relora on the single and fsdp2 "
            "(one rank) backends, with "
            "ratios against full; logits of the flash and te attention kernels against sdpa; one galore_8bit step "
            f"through bitsandbytes against galore; peak memory of a {real.mem_model} galore_8bit step with per-layer "
            "updates. One table, each row next to its target with PASS/FAIL/SKIP; exit status 1 when a row FAILs, 2 "
            "without a CUDA device (one line: a GPU job that lost its GPU must not pass; --dry-run is the CPU mode). "
            "A row whose optional package does not import (flash-attn, transformer-engine's "
            "transformer_engine.pytorch, bitsandbytes) is a SKIP. "
            "See docs/benchmarks.md (GPU acceptance check) for the targets and how each figure is measured."
        ),
        epilog="Example: python tools/gpu_check.py --json gpu_check.json; python tools/gpu_check.py --dry-run",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the same code on CPU with tiny shapes (debug model, a few steps), targets not judged: checks the "
        "plumbing, not the numbers",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every row as JSON")
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help=f"token shards the training runs read (default {real.data}; the built-in quickstart data is made "
        "there when missing)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="GROUPS",
        help=f"comma-separated row groups to run, of {','.join(CHECK_GROUPS)} (default: all)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"untimed steps per throughput run (default {real.warmup_steps})"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"timed steps per throughput run (default {real.timed_steps})"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help=f"throughput sequence length (default {real.seq_len})"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help=f"throughput sequences per step (default {real.micro_batch})"
    )
    parser.add_argument(
        "--galore-svd",
        choices=("full", "randomized"),
        default=None,
        help=f"projector function whose refresh time is amortised over the GaLore gap (default {real.galore_svd}, "
        "the method's default)",
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    from megatron_pept.cli import run_cli

    return run_cli(lambda: _run(args), prog=prog)


def _run(args: argparse.Namespace) -> int:
    from megatron_pept.bench.gpu_check import (
        GpuCheckSettings,
        format_table,
        require_cuda,
        run_gpu_check,
        with_overrides,
    )

    if not args.dry_run:
        require_cuda()  # first: one line and exit 2, nothing measured or written
    base = GpuCheckSettings.for_dry_run() if args.dry_run else GpuCheckSettings()
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip()) if args.only else None
    settings = with_overrides(
        base,
        data=args.data,
        groups=groups,
        warmup_steps=args.warmup,
        timed_steps=args.steps,
        seq_len=args.seq_len,
        attention_seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        galore_svd=args.galore_svd,
    )
    result = run_gpu_check(settings)
    print(format_table(result))
    if args.json is not None:
        _write_json(args.json, result.to_dict())
    return result.exit_code


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
