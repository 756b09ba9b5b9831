"""SentencePiece tokenizers: training and loading.

A tokenizer folder holds ``tokenizer.model`` (SentencePiece) and ``tokenizer_meta.json`` (vocabulary size,
special ids, the model file's sha256). Shard indexes record that checksum, so data made with one tokenizer is
never silently read with another.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from megatron_pept.errors import DataError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer_meta.json"


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Tokenizer:
    """A loaded SentencePiece model with the ids the data pipeline needs."""

    processor: spm.SentencePieceProcessor
    path: Path
    sha256: str

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load from a tokenizer folder (with ``tokenizer.model``) or the ``.model`` file itself."""
    path = Path(path)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise DataError(f"no tokenizer at {path}: expected {MODEL_FILE}; make one with tools/train_tokenizer.py")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(model_path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{model_path} is not a SentencePiece model ({err})") from None
    return Tokenizer(processor=processor, path=model_path, sha256=sha256_file(model_path))


def train_sentencepiece(
    texts: Iterable[str],
    *,
    output_dir: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "bpe",
    num_threads: int = 2,
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 1 << 14,
    input_sentence_size: int = 0,
    seed_sentencepiece_size: int = 1_000_000,
) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (one document each) and write it with its metadata.

    Ids follow LLaMA: 0 unk, 1 bos, 2 eos, no pad. Byte fallback (default on) makes every string encodable. The
    folder is written atomically: a partially trained tokenizer never appears at ``output_dir``.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer model type must be bpe or unigram; got {model_type!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise DataError(f"tokenizer output {output_dir} already exists and is not empty; choose a new folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if output_dir.exists():
        output_dir.rmdir()
    num_docs = 0

    def sentences() -> Iterable[str]:
        nonlocal num_docs
        for text in texts:
            if text and not text.isspace():
                num_docs += 1
                yield text

    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp") as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences()),
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                num_threads=num_threads,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                seed_sentencepiece_size=seed_sentencepiece_size,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                hard_vocab_limit=True,
                minloglevel=2,
            )
        except RuntimeError as err:
            if num_docs == 0:
                raise DataError("no text to train the tokenizer on: every input document was empty") from None
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise DataError(f"SentencePiece training failed: {msg}") from None
        os.replace(f"{prefix}.model", os.path.join(tmp, MODEL_FILE))
        os.remove(f"{prefix}.vocab")
        tok = load_tokenizer(os.path.join(tmp, MODEL_FILE))
        meta = {
            "type": "sentencepiece",
            "model_type": model_type,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "byte_fallback": byte_fallback,
            "documents": num_docs,
            "sha256": tok.sha256,
        }
        Path(tmp, META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, output_dir)
        os.makedirs(tmp)  # TemporaryDirectory removes its path on exit, so leave an empty one behind
    return load_tokenizer(output_dir)
