"""Built-in datasets made on the spot (no download), through the same pipeline as user data.

``quickstart``: a synthetic story corpus is written as JSONL, a SentencePiece tokenizer is trained on it
(:func:`train_tokenizer_from_sources`) and the corpus is tokenized into a shard folder (:func:`prepare_dataset`),
exactly what ``tools/train_tokenizer.py`` and ``tools/prepare_data.py`` do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from megatron_pept.data.corpus import generate_stories
from megatron_pept.data.prepare import PrepareOptions, prepare_dataset
from megatron_pept.data.shards import INDEX_FILE
from megatron_pept.data.tokenizer import train_tokenizer_from_sources
from megatron_pept.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = {
    # name: (documents, tokenizer vocabulary, validation fraction, tokens per shard)
    "quickstart": (24_000, 1024, 0.05, 1 << 19),
}


def ensure_builtin_dataset(name: str, path: str | os.PathLike[str], *, seed: int = 1234, workers: int = 2) -> Path:
    """Make the built-in dataset ``name`` at ``path`` unless a complete one is already there."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset '{name}'; choose one of {', '.join(BUILTIN_DATASETS)}")
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return path
    if path.exists() and not path.is_dir():
        raise DataError(f"data.path {path} is a file, not a folder: point data.path at a new or empty folder")
    if path.exists() and any(path.iterdir()):
        raise DataError(
            f"data.path {path} exists but holds no {INDEX_FILE}; refusing to write the built-in dataset over it "
            "(point data.path at an empty or new folder)"
        )
    num_docs, vocab_size, val_fraction, shard_tokens = BUILTIN_DATASETS[name]
    logger.info("generating the built-in '%s' dataset in %s (%d documents)", name, path, num_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        corpus = work / "corpus.jsonl"
        with corpus.open("w") as f:
            for text in generate_stories(num_docs, seed=seed):
                f.write(json.dumps({"text": text}) + "\n")
        tokenizer = train_tokenizer_from_sources(
            [str(corpus)], output_dir=work / "tokenizer", vocab_size=vocab_size, num_threads=workers
        )
        prepare_dataset(
            PrepareOptions(
                inputs=(str(corpus),),
                tokenizer=str(tokenizer.path.parent),
                output=str(work / "shards"),
                shard_tokens=shard_tokens,
                val_fraction=val_fraction,
                seed=seed,
                workers=workers,
            ),
            show_progress=False,
        )
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(work / "shards", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
