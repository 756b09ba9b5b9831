#!/usr/bin/env python
"""Train several methods on the same data, model and steps, and print their validation losses side by side.

  python tools/compare_methods.py --config configs/quickstart.yaml --method full --method lora \
      --method relora method.warm_start_steps=100 -- train.steps=1000

Each ``--method NAME [KEY=VALUE ...]`` is one run (its overrides apply to it alone); overrides after ``--``
apply to every run. Runs go to ``<run_dir>/<index>-<name>`` and use the same seed, so they see the same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_pept.cli import run_cli


def split_runs(tokens: list[str]) -> tuple[list[list[str]], list[str]]:
    """``--method a x=1 --method b -- y=2`` -> ([["method.name=a", "x=1"], ["method.name=b"]], ["y=2"])."""
    runs: list[list[str]] = []
    shared: list[str] = []
    target: list[str] | None = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--method":
            if i + 1 >= len(tokens):
                raise SystemExit("compare_methods.py: error: --method needs a name")
            runs.append([f"method.name={tokens[i + 1]}"])
            target, i = runs[-1], i + 2
            continue
        if tok == "--":
            target = shared
        elif target is None:
            raise SystemExit(f"compare_methods.py: error: {tok!r} comes before any --method")
        else:
            target.append(tok)
        i += 1
    return runs, shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_methods.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, metavar="FILE")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args, rest = parser.parse_known_args(argv)
    runs, shared = split_runs(rest)
    if not runs:
        parser.error("give at least one --method")

    def run() -> int:
        from megatron_pept.errors import UserError
        from megatron_pept.registry import load_config
        from megatron_pept.trainer import Trainer

        results = []
        base = load_config(args.config, shared)
        for index, overrides in enumerate(runs):
            label = " ".join(overrides).replace("method.name=", "")
            run_dir = Path(base.run_dir) / f"{index}-{overrides[0].split('=', 1)[1]}"
            cfg = load_config(args.config, [*shared, *overrides, f"run_dir={run_dir}"])
            with Trainer(cfg) as trainer:  # each run releases its run_dir when done
                result = trainer.train()
            if not result.val_losses:  # stopped by a signal, or train.eval_interval=0
                raise UserError(
                    f"run {label} ({run_dir}) ended at step {trainer.state.step} without a validation loss; rerun to "
                    "resume it, and keep train.eval_interval > 0"
                )
            last = max(result.val_losses)
            results.append({"run": label, "val_loss": result.val_losses[last], "val_losses": result.val_losses})
            print(f"{label}: val_loss {result.val_losses[last]:.4f} at step {last}", flush=True)
        width = max(len(r["run"]) for r in results)
        print(f"\n{'run':<{width}}  final val_loss")
        for r in results:
            print(f"{r['run']:<{width}}  {r['val_loss']:.4f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0

    return run_cli(run, prog="compare_methods.py")


if __name__ == "__main__":
    sys.exit(main())
