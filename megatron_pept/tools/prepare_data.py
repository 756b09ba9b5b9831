"""Tokenize a text corpus into a shard folder for training (data.path).

  megatron-pept-prepare-data --input c4/*.jsonl --tokenizer data/tokenizer --output data/c4
  (python tools/prepare_data.py ... in a checkout)

Inputs as for megatron-pept-train-tokenizer. Each document becomes [BOS] ids EOS; documents are held out for
validation by a seeded hash of their number. Interrupted? Run the same command again: finished shards are kept,
the rest is redone, and the result is identical to an uninterrupted run. A record that cannot be read (invalid
UTF-8, a binary file, a malformed JSON line, a missing text field) stops it with one line naming the file and
line, unless --skip-bad-records skips and counts such records.
"""

from __future__ import annotations

import argparse
import os

from megatron_pept.cli import run_cli

PROG = "megatron-pept-prepare-data"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="text sources (files, globs, folders, datasets names)"
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="tokenizer folder (or .model file) from train_tokenizer.py, or a Hugging Face tokenizer.json (or the "
        "model folder holding it)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="shard folder to create (or to resume)")
    parser.add_argument("--text-field", default="text", help="field holding the text (default text)")
    parser.add_argument("--split", default="train", help="split of a datasets source (default train)")
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 27,
        help="tokens per shard, closed at a document boundary (default 134M)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.005, help="share of documents held out for validation (default 0.005)"
    )
    parser.add_argument("--add-bos", action="store_true", help="start each document with BOS (EOS always ends it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out (default 0)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "uint16", "uint32"),
        default="auto",
        help="token dtype (auto: uint16 when the vocabulary fits)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument(
        "--batch-documents", type=int, default=256, help="documents per batch sent to a worker (default 256)"
    )
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip records of .txt/.jsonl/.json inputs that cannot be read (invalid UTF-8, NUL bytes, malformed "
        "JSON lines, a missing or non-text field) and count them, instead of stopping at the first with its file and "
        "line; the count is printed and kept in index.json (bad_records_skipped)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> int:
        from megatron_pept.data.prepare import PrepareOptions, prepare_dataset

        result = prepare_dataset(
            PrepareOptions(
                inputs=tuple(args.input),
                tokenizer=args.tokenizer,
                output=args.output,
                text_field=args.text_field,
                split=args.split,
                shard_tokens=args.shard_tokens,
                val_fraction=args.val_fraction,
                add_bos=args.add_bos,
                seed=args.seed,
                dtype=args.dtype,
                workers=args.workers,
                batch_documents=args.batch_documents,
                skip_bad_records=args.skip_bad_records,
            ),
            show_progress=not args.no_progress,
        )
        if result.already_complete:
            print(f"{args.output} is already complete (same inputs and settings); nothing to do")
            return 0
        splits = result.index.splits
        skipped = (
            f"; skipped {result.bad_records:,} bad record(s), the first: {result.bad_record_examples[0]}"
            if result.bad_records
            else ""
        )
        print(
            f"wrote {args.output}: train {splits['train'].documents:,} documents / {splits['train'].tokens:,} tokens "
            f"in {len(splits['train'].shards)} shards, val {splits['val'].documents:,} documents / "
            f"{splits['val'].tokens:,} tokens; {result.text_bytes / 1e6:.1f} MB of text in {result.seconds:.1f} s "
            f"({result.mb_per_sec:.1f} MB/s){' (resumed)' if result.resumed else ''}{skipped}"
        )
        return 0

    return run_cli(run, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
