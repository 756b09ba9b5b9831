"""SentencePiece tokenizers: training and loading.

A tokenizer folder holds ``tokenizer.model`` (SentencePiece) and ``tokenizer_meta.json`` (vocabulary size,
special ids, the model file's sha256). Shard indexes record that checksum, so data made with one tokenizer is
never silently read with another.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from megatron_pept.data.shards import sha256_file
from megatron_pept.errors import DataError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer_meta.json"


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

    def encode(self, texts: list[str], *, num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text; SentencePiece encodes a batch on ``num_threads`` threads (-1: all cores)."""
        return self.processor.encode(texts, out_type=int, num_threads=num_threads)

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
    seed: int = 0,
) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (one document each) and write it with its metadata.

    Ids follow LLaMA: 0 unk, 1 bos, 2 eos, no pad. Byte fallback (default on) makes every string encodable. The
    folder is written atomically: a partially trained tokenizer never appears at ``output_dir``. The same texts,
    settings and ``seed`` give a byte-identical model file.
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

    spm.set_random_generator_seed(seed)  # SentencePiece samples and shuffles training sentences
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp") as tmp:
        prefix = os.path.join(tmp, "spm")
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
        _write_portable_model(f"{prefix}.model", os.path.join(tmp, MODEL_FILE))
        os.remove(f"{prefix}.model")
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


def _write_portable_model(src: str, dst: str) -> None:
    """Copy a trained model without the temporary path and thread count SentencePiece records in it, so its
    sha256 depends only on the training data and the settings that shape the vocabulary."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(src, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = "tokenizer"
    proto.trainer_spec.num_threads = 1  # the pieces do not depend on it (a test checks)
    with open(dst, "wb") as f:
        f.write(proto.SerializeToString())


def tokenizer_sentences(documents: Iterable[str], *, max_chars: int = 4096) -> Iterable[str]:
    """Lines of documents for SentencePiece training, long lines cut into pieces of at most ``max_chars``.

    SentencePiece silently drops any training sentence longer than its ``max_sentence_length`` (bytes), so whole
    web documents would vanish; paragraphs are the unit it is built for.
    """
    for doc in documents:
        for line in doc.split("\n"):
            line = line.strip()
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


def train_tokenizer_from_sources(
    inputs: list[str],
    *,
    output_dir: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "bpe",
    text_field: str = "text",
    split: str = "train",
    num_threads: int = 2,
    byte_fallback: bool = True,
    max_sentences: int = 5_000_000,
    character_coverage: float = 0.9995,
    seed: int = 0,
) -> Tokenizer:
    """Train a SentencePiece tokenizer on text files or a ``datasets`` source (see ``data.sources``).

    SentencePiece samples at most ``max_sentences`` lines (0: all) to bound its memory.
    """
    from megatron_pept.data.sources import iter_corpus, resolve_source

    for spec in inputs:
        resolve_source(spec)
    if vocab_size < 2:
        raise DataError(f"vocabulary size must be >= 2; got {vocab_size}")
    documents = iter_corpus(list(inputs), text_field=text_field, split=split)
    return train_sentencepiece(
        tokenizer_sentences(documents),
        output_dir=output_dir,
        vocab_size=vocab_size,
        model_type=model_type,
        num_threads=num_threads,
        byte_fallback=byte_fallback,
        input_sentence_size=max_sentences,
        character_coverage=character_coverage,
        seed=seed,
    )
