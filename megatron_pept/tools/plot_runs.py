"""Plot the training curves of several runs side by side against tokens: loss.png (train and validation loss),
lr.png, throughput.png and a figure per method tag prefix (relora.png, galore.png ...), plus plots.json listing
the figures and their tags. Exits 2 on a usage error (one line).

  megatron-pept-plot-runs runs/full runs/relora --output figures --label full --label relora --smooth 10
  (python tools/plot_runs.py ... in a checkout)

Needs matplotlib: pip install 'megatron_pept[study]'.
"""

from __future__ import annotations

import argparse

from megatron_pept.cli import run_cli

PROG = "megatron-pept-plot-runs"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (TensorBoard events, config.yaml)")
    parser.add_argument("--output", required=True, help="folder for the figures and plots.json (created if missing)")
    parser.add_argument(
        "--label",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="legend name of each run, in the order of the run folders (after them, or repeated: --label a --label b; "
        "default: the folder names)",
    )
    parser.add_argument(
        "--smooth", type=int, default=1, metavar="N", help="moving average of N steps over the train loss (default 1)"
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> int:
        from megatron_pept.study.plots import plot_runs

        report = plot_runs(args.run_dirs, output=args.output, labels=args.label, smooth=args.smooth)
        for name, figure in report["figures"].items():
            print(f"{args.output}/{name}: {', '.join(figure['tags'])}")
        print(f"{args.output}/plots.json")
        return 0

    return run_cli(run, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
