"""Built-in datasets made on the spot (no download): the quickstart corpus, tokenized into a shard folder."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from megatron_pept.data.corpus import generate_stories
from megatron_pept.data.shards import INDEX_FILE, SPLITS, DataIndex, ShardWriter, token_dtype
from megatron_pept.data.tokenizer import MODEL_FILE, Tokenizer, load_tokenizer, train_sentencepiece
from megatron_pept.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = {
    # name: (documents, tokenizer vocabulary, validation fraction, tokens per shard)
    "quickstart": (24_000, 1024, 0.05, 1 << 19),
}


def write_token_shards(
    documents: Iterable[tuple[str, str]],
    *,
    tokenizer: Tokenizer,
    output_dir: str | os.PathLike[str],
    shard_tokens: int,
    add_bos: bool = False,
    encode_batch_docs: int = 512,
) -> DataIndex:
    """Tokenize ``(split, text)`` pairs into ``output_dir`` (which must exist and hold the tokenizer copy).

    Each document becomes ``[BOS] ids EOS``. The index is written last, so the folder counts as complete only
    when every shard is.
    """
    out = Path(output_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(out, split=s, dtype=dtype, shard_tokens=shard_tokens) for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}

    def encode(split: str) -> None:
        for ids in tokenizer.encode(pending[split]):
            writers[split].add(([tokenizer.bos_id] if add_bos else []) + ids + [tokenizer.eos_id])
        pending[split].clear()

    for split, text in documents:
        pending[split].append(text)
        if len(pending[split]) >= encode_batch_docs:
            encode(split)
    for split in SPLITS:
        encode(split)
    index = DataIndex(
        root=out,
        dtype=dtype.str,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id if add_bos else None,
        tokenizer_sha256=tokenizer.sha256,
        splits={s: w.close() for s, w in writers.items()},
    )
    index.write()
    return index


def ensure_builtin_dataset(name: str, path: str | os.PathLike[str], *, seed: int = 1234) -> Path:
    """Make the built-in dataset ``name`` at ``path`` unless a complete one is already there."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset '{name}'; choose one of {', '.join(BUILTIN_DATASETS)}")
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise DataError(
            f"data.path {path} exists but holds no {INDEX_FILE}; refusing to write the built-in dataset over it "
            "(point data.path at an empty or new folder)"
        )
    num_docs, vocab_size, val_fraction, shard_tokens = BUILTIN_DATASETS[name]
    logger.info("generating the built-in '%s' dataset in %s (%d documents)", name, path, num_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        rng = random.Random(seed)
        docs = [
            ("val" if rng.random() < val_fraction else "train", text) for text in generate_stories(num_docs, seed=seed)
        ]
        tokenizer = train_sentencepiece(
            (text for split, text in docs if split == "train"),
            output_dir=tmp / "tokenizer",
            vocab_size=vocab_size,
        )
        shutil.copy(tokenizer.path, tmp / MODEL_FILE)
        shutil.rmtree(tmp / "tokenizer")
        tokenizer = load_tokenizer(tmp / MODEL_FILE)
        write_token_shards(docs, tokenizer=tokenizer, output_dir=tmp, shard_tokens=shard_tokens)
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
