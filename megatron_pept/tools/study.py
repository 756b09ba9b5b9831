"""Run a method study: each method at the best learning rate of its own grid, on the same model, data and token
budget; writes study.json and study.md (validation loss, perplexity, bits per byte, trainable parameters, the
peak-memory split, tokens/s, and ratios to the baseline). Rerunning skips finished runs and resumes the rest.

  megatron-pept-study configs/studies/cpu_pydocs.yaml --output runs/study_cpu_pydocs
  megatron-pept-study SPEC --output DIR --only full --only relora     # train a subset, same folders; the
                                                                      # tables keep every finished method
  (python tools/study.py ... in a checkout; the spec format is in megatron_pept/study/spec.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_pept.cli import run_cli

PROG = "megatron-pept-study"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="study spec (YAML): base config, steps, grid steps, methods and their lrs")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="study folder (created or resumed)")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="LABEL",
        help="train only these methods (repeatable); the tables also hold every other method of the spec whose runs "
        "have all finished",
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> int:
        from megatron_pept.study.runner import run_study
        from megatron_pept.study.spec import load_spec

        study = run_study(load_spec(args.spec), args.output, only=args.only)
        print((args.output / "study.md").read_text(), end="")
        print(f"wrote {args.output / 'study.json'} and {args.output / 'study.md'} ({len(study['methods'])} methods)")
        return 0

    return run_cli(run, prog=prog)
