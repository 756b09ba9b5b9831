#!/usr/bin/env python
"""Print the shape of the 'control' baseline for a low-rank run: a full-rank model with as many parameters as
the run trains (ReLoRA Table 2).

  python tools/control_shape.py --config configs/relora_350m.yaml
"""

from __future__ import annotations

import argparse
import sys

from megatron_pept.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="control_shape.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="FILE", help="the low-rank run's YAML config")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default: model.vocab_size or 32000)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from megatron_pept.methods.control import control_shape, trainable_parameters
        from megatron_pept.models import DEFAULT_VOCAB_SIZE
        from megatron_pept.registry import load_config

        cfg = load_config(args.config, ["data.path=unused", *args.overrides])
        vocab = args.vocab_size or cfg.model.vocab_size or DEFAULT_VOCAB_SIZE
        trainable, total = trainable_parameters(cfg.model, cfg.method, vocab_size=vocab)
        shape = control_shape(cfg.model, target_params=trainable, vocab_size=vocab)
        print(
            f"{cfg.method.name} on {cfg.model.name} (rank {cfg.method.options.get('rank', '-')}, vocab {vocab}): "
            f"{trainable / 1e6:.1f}M trainable of {total / 1e6:.1f}M parameters"
        )
        print(
            f"control: {shape.params / 1e6:.1f}M parameters ({100 * shape.relative_error:+.1f}%), "
            f"{shape.args.num_layers} layers of width {shape.args.hidden_size}"
        )
        print("overrides: method.name=full " + " ".join(shape.overrides()))
        return 0

    return run_cli(run, prog="control_shape.py")


if __name__ == "__main__":
    sys.exit(main())
