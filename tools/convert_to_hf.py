#!/usr/bin/env python
"""Export a megatron_pept checkpoint to a Hugging Face LlamaForCausalLM folder (config.json, safetensors weights,
tokenizer) that transformers loads with from_pretrained / AutoTokenizer.

  python tools/convert_to_hf.py --checkpoint runs/quickstart --output hf/quickstart

--checkpoint takes a checkpoint folder (step_00000300), a checkpoints folder or a run_dir (then the newest
complete checkpoint). Checkpoints of any method and of single/DDP/FSDP2 runs on any number of ranks: adapters are
merged into dense weights, low-precision bases dequantised, optimizer state left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megatron_pept  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_pept.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_to_hf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="checkpoint folder, checkpoints folder or run_dir"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="new folder for the Hugging Face model")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype (default fp32)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from megatron_pept.checkpoint.hf_export import export_to_hf

        out = export_to_hf(args.checkpoint, args.output, dtype=args.dtype)
        print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer)")
        return 0

    return run_cli(run, prog="convert_to_hf.py")


if __name__ == "__main__":
    sys.exit(main())
