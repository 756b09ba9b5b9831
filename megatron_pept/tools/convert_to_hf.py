"""Export a megatron_pept checkpoint to a Hugging Face LlamaForCausalLM folder (config.json, safetensors weights,
tokenizer) that transformers loads with from_pretrained / AutoTokenizer.

  megatron-pept-convert-to-hf --checkpoint runs/quickstart --output hf/quickstart
  (python tools/convert_to_hf.py ... in a checkout; needs transformers: pip install 'megatron_pept[hf]')

--checkpoint takes a checkpoint folder (step_00000300), a checkpoints folder or a run_dir (then the newest
complete checkpoint). Checkpoints of any method and of single/DDP/FSDP2 runs on any number of ranks and of
DeepSpeed ZeRO-1/2/3 runs (consolidated by DeepSpeed's own functions, read without pickle): adapters are merged
into dense weights, low-precision bases dequantised, optimizer state left out. The model is rebuilt with sdpa
attention, so a run trained with model.attention=flash or te exports where neither package is installed (every
kernel computes the same function of the same weights). config.json is read the same by
transformers 4.x and 5.x; it declares model.max_position_embeddings as the context (null: 2048, or data.seq_len if
larger; --max-position-embeddings overrides it). The tokenizer is the run's SentencePiece model converted, or its
Hugging Face tokenizer.json carried as it is.

--output must be a new or empty folder: a non-empty one is refused (exit 2) unless --overwrite is given, and is
then replaced only once the new export is complete. The export is written to a hidden folder of its own beside
--output (.NAME.<random>) and renamed into place at the end, so a failure (a full or read-only disk, a damaged
checkpoint) or Ctrl-C leaves nothing behind (a killed export may leave its own hidden folder, never a partial
--output); no folder the tool did not make is ever removed. An --output that is a symbolic link, a file, or a
folder that is, holds or lies inside the checkpoint is refused. Mistakes and failed writes are one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse

from megatron_pept.cli import run_cli

PROG = "megatron-pept-convert-to-hf"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    # The paragraph on --output (its refusals and --overwrite) is the one users need when an export is refused.
    output_rules = next(part for part in __doc__.split("\n\n") if part.startswith("--output"))
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=output_rules)
    parser.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="checkpoint folder, checkpoints folder or run_dir"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="new (or empty) folder for the Hugging Face model"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it is a non-empty folder (only once the new export is complete)",
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype (default fp32)"
    )
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        metavar="N",
        help="context the export declares (default: the run's model.max_position_embeddings, else 2048 or "
        "data.seq_len if larger)",
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> int:
        from pathlib import Path

        from megatron_pept.safe_paths import check_export_output, existing

        # The mistakes that need no checkpoint read answer before torch and transformers load (seconds).
        check_export_output(Path(args.output), overwrite=args.overwrite)
        existing(args.checkpoint)
        from megatron_pept.checkpoint.hf_export import export_to_hf

        out = export_to_hf(
            args.checkpoint,
            args.output,
            dtype=args.dtype,
            max_position_embeddings=args.max_position_embeddings,
            overwrite=args.overwrite,
        )
        print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer)")
        return 0

    return run_cli(run, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
