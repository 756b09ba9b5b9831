"""Train a SentencePiece tokenizer on a text corpus.

  megatron-pept-train-tokenizer --input c4/*.jsonl --vocab-size 32000 --output data/tokenizer
  (python tools/train_tokenizer.py ... in a checkout)

Inputs: .txt (a document per line), .jsonl/.json (a text field), .parquet, a folder of those, a folder saved
with datasets' save_to_disk, or a Hugging Face datasets name. Writes tokenizer.model and tokenizer_meta.json.

By default text is kept exactly, as LLaMA's tokenizer does (no normalisation; spaces, tabs and newlines survive,
newlines as the byte piece <0x0A>; digits split): decode(encode(text)) == text. --normalization nfkc trains as
earlier versions did.
"""

from __future__ import annotations

import argparse
import os

from megatron_pept.cli import run_cli

PROG = "megatron-pept-train-tokenizer"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="text sources (files, globs, folders, datasets names)"
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 32000")
    parser.add_argument("--output", required=True, metavar="DIR", help="new folder for the tokenizer")
    parser.add_argument(
        "--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm (default bpe)"
    )
    parser.add_argument(
        "--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets (default text)"
    )
    parser.add_argument("--split", default="train", help="split of a datasets source (default train)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="SentencePiece training threads (default: all cores)"
    )
    parser.add_argument(
        "--no-byte-fallback", action="store_true", help="map unseen characters to <unk> instead of UTF-8 bytes"
    )
    parser.add_argument(
        "--max-sentences", type=int, default=5_000_000, help="lines sampled for training, 0 for all (default 5M)"
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters covered by pieces (default 0.9995)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of SentencePiece's sentence sampling (default 0)")
    parser.add_argument(
        "--normalization",
        choices=("identity", "nfkc"),  # megatron_pept.data.tokenizer.NORMALIZATIONS (a test checks)
        default="identity",
        help="identity (default, LLaMA's): text kept exactly, whitespace and newlines included, digits split; "
        "nfkc: the earlier behaviour (SentencePiece's defaults): NFKC, newlines and tabs read as spaces, runs of "
        "spaces collapsed, lines stripped, digits not split",
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> int:
        from megatron_pept.data.tokenizer import train_tokenizer_from_sources

        tok = train_tokenizer_from_sources(
            args.input,
            output_dir=args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            text_field=args.text_field,
            split=args.split,
            num_threads=args.threads,
            byte_fallback=not args.no_byte_fallback,
            max_sentences=args.max_sentences,
            character_coverage=args.character_coverage,
            seed=args.seed,
            normalization=args.normalization,
        )
        print(f"wrote {tok.path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:16]}...)")
        return 0

    return run_cli(run, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
