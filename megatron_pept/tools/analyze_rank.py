"""The rank of the weight update between two checkpoints of one model (ReLoRA, Figures 3 and 4): per linear
layer of the transformer blocks, the singular values of W_B - W_A (adapters merged), grouped by layer type, as
rank_spectra.png, rank_counts.png (singular values above --threshold), rank.json and rank.md. Exits 2 on a usage
error (one line).

  megatron-pept-analyze-rank init:runs/relora runs/relora --output rank
  megatron-pept-analyze-rank --pair full init:runs/full runs/full --pair relora init:runs/relora runs/relora \\
      --output rank --threshold 0.1
  (python tools/analyze_rank.py ... in a checkout)

A checkpoint is a checkpoint folder, or a checkpoints folder or run_dir (its newest complete checkpoint);
init:RUN_DIR is the run's weights before its first step, rebuilt from its config.yaml and train.seed. Needs
matplotlib: pip install 'megatron_pept[study]'.
"""

from __future__ import annotations

import argparse

from megatron_pept.cli import run_cli

PROG = "megatron-pept-analyze-rank"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoints", nargs="*", metavar="CKPT", help="CKPT_A CKPT_B: one pair (CKPT_A may be init:RUN_DIR)"
    )
    parser.add_argument(
        "--pair",
        nargs=3,
        action="append",
        default=[],
        metavar=("LABEL", "CKPT_A", "CKPT_B"),
        help="a labelled pair (repeat for several: they share the figures)",
    )
    parser.add_argument("--label", help="legend name of the CKPT_A CKPT_B pair (default: the run folder's name)")
    parser.add_argument("--output", required=True, help="folder for the figures, rank.json and rank.md")
    parser.add_argument(
        "--threshold", type=float, default=0.1, help="count singular values above this (default 0.1, as the paper)"
    )
    parser.add_argument(
        "--init-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device init:RUN_DIR is rebuilt on; CPU and CUDA generators draw different numbers, so give the one the "
        "run trained on (auto: as the trainer picks it from train.device)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the SVDs run (default cpu)")
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_intermixed_args(argv)

    def run() -> int:
        from megatron_pept.errors import UserError
        from megatron_pept.study.rank import RankPair, analyze_rank, default_pair_label

        pairs = [RankPair(label, a, b) for label, a, b in args.pair]
        if args.checkpoints:
            if len(args.checkpoints) != 2:
                raise UserError(
                    f"give two checkpoints (CKPT_A CKPT_B), not {len(args.checkpoints)}; several pairs with "
                    "--pair LABEL CKPT_A CKPT_B"
                )
            a, b = args.checkpoints
            pairs.insert(0, RankPair(args.label or default_pair_label(b), a, b))
        elif args.label:
            raise UserError("--label names the CKPT_A CKPT_B pair; a --pair carries its own label")
        report = analyze_rank(
            pairs, output=args.output, threshold=args.threshold, init_device=args.init_device, device=args.device
        )
        t = report["threshold"]
        for pair in report["pairs"]:
            print(f"{pair['label']}: {pair['a']['source']} -> {pair['b']['source']}")
            for kind, s in pair["types"].items():
                shape = f"{s['shape'][0]}x{s['shape'][1]}"
                print(
                    f"  {kind:<10} {shape:<11} above {t:g}: mean {s['count_mean']:.1f} "
                    f"(min {s['count_min']}, max {s['count_max']}) of {s['full_rank']}"
                )
        print(f"wrote {args.output}/rank_spectra.png, rank_counts.png, rank.json, rank.md")
        return 0

    return run_cli(run, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
