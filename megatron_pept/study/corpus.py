"""The English corpus of the CPU method study (docs/results.md): the reStructuredText sources of the Python 3.11
documentation as Debian ships them (package ``python3.11-doc``, ``/usr/share/doc/python3.11/html/_sources``;
Python Software Foundation License Version 2). About 11 MB of English prose with code examples, one document
per source file, written as JSONL for ``megatron-pept-prepare-data``."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_pept.errors import UserError


def docs_corpus(source: Path, out: Path) -> tuple[int, int]:
    """Write every non-empty ``*.txt`` file under ``source`` (sorted by path, so the corpus and its validation
    split are the same on every machine) as one JSONL document; returns (documents, UTF-8 bytes)."""
    files = sorted(p for p in Path(source).rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"no .txt sources under {source}; extract python3.11-doc there first (tools/study_pydocs.sh)")
    docs = nbytes = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for path in files:
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                continue
            f.write(json.dumps({"text": text, "source": str(path.relative_to(source))}) + "\n")
            docs += 1
            nbytes += len(text.encode("utf-8"))
    tmp.replace(out)
    return docs, nbytes


def main(argv: list[str] | None = None) -> int:
    import argparse

    from megatron_pept.cli import run_cli

    parser = argparse.ArgumentParser(prog="python -m megatron_pept.study.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder of .txt sources (the package's html/_sources)")
    parser.add_argument("output", type=Path, help="JSONL file to write")
    args = parser.parse_args(argv)

    def run() -> int:
        docs, nbytes = docs_corpus(args.source, args.output)
        print(f"wrote {args.output}: {docs} documents, {nbytes:,} bytes")
        return 0

    return run_cli(run, prog="corpus")


if __name__ == "__main__":
    raise SystemExit(main())
