"""Tokenizers: SentencePiece (training, loading, conversion to a Hugging Face ``tokenizers`` pipeline) and
existing Hugging Face tokenizers (``tokenizer.json``, read with the ``tokenizers`` library).

A tokenizer folder of ours holds ``tokenizer.model`` (SentencePiece) and ``tokenizer_meta.json`` (vocabulary size,
special ids, normalisation settings, the model file's sha256). A Hugging Face tokenizer is a ``tokenizer.json``
(a model folder or the file itself); its BOS and EOS come from the folder's ``tokenizer_config.json`` or
``special_tokens_map.json`` when present, else from the usual names (``<s>``/``</s>``,
``<|begin_of_text|>``/``<|end_of_text|>``, ``<|endoftext|>``). Shard indexes record the tokenizer file's name
and checksum, so data made with one tokenizer is never silently read with another.

Text is kept as it is by default, as LLaMA's tokenizer does: no Unicode normalisation, spaces, tabs and newlines
all survive, so ``decode(encode(text)) == text`` for every string (``normalization="identity"``). The earlier
behaviour, SentencePiece's defaults (NFKC, newlines and tabs turned into spaces, runs of spaces collapsed), stays
available as ``normalization="nfkc"``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from megatron_pept.data.shards import sha256_file
from megatron_pept.errors import DataError, UserError

if TYPE_CHECKING:
    import tokenizers  # a dependency of transformers, needed only to export

MODEL_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
NORMALIZATIONS = ("identity", "nfkc")


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


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library) with the same interface as :class:`Tokenizer`.
    Texts are encoded without the pipeline's own special tokens: the data pipeline adds BOS/EOS itself."""

    backend: Any  # tokenizers.Tokenizer
    path: Path
    sha256: str
    bos_id: int | None
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], *, num_threads: int = -1) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


def _special_token(folder: Path, key: str) -> str | None:
    """``bos_token``/``eos_token`` as the model folder's tokenizer_config.json or special_tokens_map.json names it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):  # {"content": "<s>", ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def load_hf_tokenizer(file: Path) -> HFTokenizer:
    try:
        import tokenizers
    except ImportError:
        raise DataError("a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises its own exception type
        raise DataError(f"{file} is not a Hugging Face tokenizer.json ({err})") from None

    def token_id(key: str, names: tuple[str, ...]) -> int | None:
        named = _special_token(file.parent, key)
        for token in (named,) if named else names:
            found = backend.token_to_id(token)
            if found is not None:
                return found
        if named:
            raise DataError(f"{file.parent} names {key} {named!r}, which {file.name} does not hold")
        return None

    eos = token_id("eos_token", _EOS_NAMES)
    if eos is None:
        raise DataError(
            f"{file} has no end-of-text token (looked for eos_token in tokenizer_config.json or "
            f"special_tokens_map.json beside it, then {', '.join(_EOS_NAMES)}); add eos_token to a "
            "tokenizer_config.json in that folder"
        )
    return HFTokenizer(
        backend=backend, path=file, sha256=sha256_file(file), bos_id=token_id("bos_token", _BOS_NAMES), eos_id=eos
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | HFTokenizer:
    """Load from a tokenizer folder (ours with ``tokenizer.model``, or a Hugging Face model folder with
    ``tokenizer.json``), a ``.model`` file or a ``tokenizer.json`` file."""
    path = Path(path)
    if path.is_dir() and not (path / MODEL_FILE).is_file() and (path / HF_FILE).is_file():
        return load_hf_tokenizer(path / HF_FILE)
    if path.suffix == ".json" and path.is_file():
        return load_hf_tokenizer(path)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise DataError(
            f"no tokenizer at {path}: expected {MODEL_FILE} (make one with megatron-pept-train-tokenizer, "
            f"tools/train_tokenizer.py in a checkout) or a Hugging Face {HF_FILE}"
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(model_path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{model_path} is not a SentencePiece model ({err})") from None
    return Tokenizer(processor=processor, path=model_path, sha256=sha256_file(model_path))


def sentencepiece_options(normalization: str, *, byte_fallback: bool) -> dict[str, Any]:
    """The SentencePiece trainer settings that decide how text is normalised and split, for ``normalization``.

    ``identity`` (default) is LLaMA's: no normaliser, whitespace kept (``remove_extra_whitespaces=False``, runs of
    spaces may form pieces), digits split one per piece, a dummy space prefix (so a word reads the same at the start
    of a text as after a space). ``nfkc`` passes nothing: SentencePiece's defaults, which this project used before
    (NFKC, newlines and tabs to spaces, runs of spaces collapsed, leading and trailing spaces dropped), the same
    trainer settings as before ``identity`` became the default.
    """
    if normalization == "nfkc":
        return {}
    if normalization != "identity":
        raise DataError(f"tokenizer normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}")
    options: dict[str, Any] = {
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "add_dummy_prefix": True,
    }
    # Newlines never reach the trainer (it learns from lines, see tokenizer_sentences), so no piece holds one and
    # the encoder writes each "\n" as the byte piece <0x0A>, as LLaMA does: lossless, and no vocabulary slot spent.
    # Measured on Python standard library text, a newline about every 40 characters (vocabularies 600 and 2000):
    # training on whole 4 KB chunks instead, so pieces like ":\n" or "\n\n" form, gave 4% fewer tokens, but it
    # cuts documents mid-word, makes --max-sentences count 4 KB chunks (memory) and departs from LLaMA's ids; a
    # user-defined "\n" piece gave exactly the byte fallback's token count, spends a slot, and transformers splits
    # text around such pieces before adding the dummy prefix, so the export would no longer match. Without byte
    # fallback "\n" would be <unk>, so it is then made a required character (an ordinary one-character piece).
    if not byte_fallback:
        options["required_chars"] = "\n"
    return options


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
    normalization: str = "identity",
) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (training sentences, e.g. from :func:`tokenizer_sentences`) and
    write it with its metadata.

    Ids follow LLaMA: 0 unk, 1 bos, 2 eos, no pad. Byte fallback (default on) makes every string encodable.
    ``normalization`` is ``identity`` (default: text kept exactly, LLaMA's settings) or ``nfkc`` (the earlier
    behaviour); see :func:`sentencepiece_options`. The folder is written atomically: a partially trained tokenizer
    never appears at ``output_dir``. The same texts, settings and ``seed`` give a byte-identical model file.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer model type must be bpe or unigram; got {model_type!r}")
    options = sentencepiece_options(normalization, byte_fallback=byte_fallback)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise DataError(f"tokenizer output {output_dir} already exists and is not empty; choose a new folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if output_dir.exists():
        output_dir.rmdir()
    num_docs = 0
    read_all = False  # the input was read to its end (an empty input is told apart from a trainer that failed first)
    unreadable: list[UserError] = []  # what reading the input raised: SentencePiece turns it into a RuntimeError

    def sentences() -> Iterable[str]:
        nonlocal num_docs, read_all
        try:
            for text in texts:
                if text and not text.isspace():
                    num_docs += 1
                    yield text
        except UserError as err:
            unreadable.append(err)
            raise
        read_all = True

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
                **options,
            )
        except RuntimeError as err:
            if unreadable:  # a bad record or an unreadable source: its own one line
                raise unreadable[0] from None
            if num_docs == 0 and read_all:
                raise DataError("no text to train the tokenizer on: every input document was empty") from None
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise DataError(f"SentencePiece training failed: {msg}") from None
        _write_portable_model(f"{prefix}.model", os.path.join(tmp, MODEL_FILE))
        os.remove(f"{prefix}.model")
        os.remove(f"{prefix}.vocab")
        tok = load_tokenizer(os.path.join(tmp, MODEL_FILE))
        proto = _read_model_proto(tok.path)
        meta = {
            "type": "sentencepiece",
            "model_type": model_type,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "byte_fallback": byte_fallback,
            "normalization": normalization,
            # As the model file records them (what SentencePiece applies when encoding).
            "normalizer": {
                "name": proto.normalizer_spec.name,
                "add_dummy_prefix": proto.normalizer_spec.add_dummy_prefix,
                "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
                "escape_whitespaces": proto.normalizer_spec.escape_whitespaces,
            },
            "split_digits": proto.trainer_spec.split_digits,
            "allow_whitespace_only_pieces": proto.trainer_spec.allow_whitespace_only_pieces,
            "documents": num_docs,
            "sha256": tok.sha256,
        }
        Path(tmp, META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, output_dir)
        os.makedirs(tmp)  # TemporaryDirectory removes its path on exit, so leave an empty one behind
    return load_tokenizer(output_dir)


def _read_model_proto(path: str | os.PathLike[str]) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _write_portable_model(src: str, dst: str) -> None:
    """Copy a trained model without the temporary path and thread count SentencePiece records in it, so its
    sha256 depends only on the training data and the settings that shape the vocabulary."""
    proto = _read_model_proto(src)
    proto.trainer_spec.model_prefix = "tokenizer"
    proto.trainer_spec.num_threads = 1  # the pieces do not depend on it (a test checks)
    with open(dst, "wb") as f:
        f.write(proto.SerializeToString())


def tokenizer_sentences(
    documents: Iterable[str], *, max_chars: int = 4096, normalization: str = "identity"
) -> Iterable[str]:
    """Lines of documents for SentencePiece training, long lines cut into pieces of at most ``max_chars``.

    SentencePiece silently drops any training sentence longer than its ``max_sentence_length`` (bytes), so whole
    web documents would vanish; paragraphs are the unit it is built for. Under ``identity`` normalisation a line
    keeps its leading, inner and trailing whitespace (indentation and runs of spaces are text the model must
    learn); only the newline that ended it is gone (the encoder writes it as a byte piece, see
    :func:`sentencepiece_options`). Under ``nfkc`` lines are stripped, as before.
    """
    strip = normalization == "nfkc"
    for doc in documents:
        for line in doc.split("\n"):
            if strip:
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
    normalization: str = "identity",
) -> Tokenizer:
    """Train a SentencePiece tokenizer on text files or a ``datasets`` source (see ``data.sources``).

    SentencePiece samples at most ``max_sentences`` lines (0: all) to bound its memory. ``normalization``:
    ``identity`` (default, LLaMA's: text kept exactly, newlines as byte pieces, digits split) or ``nfkc`` (the
    earlier behaviour: NFKC, whitespace collapsed, newlines read as spaces).
    """
    from megatron_pept.data.sources import iter_corpus, resolve_source

    sentencepiece_options(normalization, byte_fallback=byte_fallback)  # refuse a bad name before reading input
    for spec in inputs:
        resolve_source(spec)
    if vocab_size < 2:
        raise DataError(f"vocabulary size must be >= 2; got {vocab_size}")
    documents = iter_corpus(list(inputs), text_field=text_field, split=split)
    return train_sentencepiece(
        tokenizer_sentences(documents, normalization=normalization),
        output_dir=output_dir,
        vocab_size=vocab_size,
        model_type=model_type,
        num_threads=num_threads,
        byte_fallback=byte_fallback,
        input_sentence_size=max_sentences,
        character_coverage=character_coverage,
        seed=seed,
        normalization=normalization,
    )


# The score of pieces SentencePiece never matches against text (control, byte and unused ones); the Unigram model
# of tokenizers matches every vocabulary entry, so these get a score no segmentation would choose.
_UNMATCHABLE_SCORE = -1e9


def hf_conversion_caveats(model_file: str | os.PathLike[str]) -> list[str]:
    """Why :func:`sentencepiece_to_hf` may not encode some text exactly as ``model_file`` does (empty: it does,
    apart from text spelling a special token, see there)."""
    proto = _read_model_proto(model_file)
    spec = proto.normalizer_spec
    kinds = proto.SentencePiece
    caveats = []
    if spec.precompiled_charsmap or spec.remove_extra_whitespaces:
        caveats.append(
            f"the model normalises text ({spec.name or 'custom rules'}"
            f"{', whitespace collapsed' if spec.remove_extra_whitespaces else ''}): tokenizers re-implements that "
            "normaliser, so ids can differ on text it changes (combining accents after compatibility characters are "
            "known cases) and decode returns the normalised text, not the input; retrain with "
            "normalization=identity for an exact export"
        )
    if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
        caveats.append(
            "unigram model: transformers' Viterbi search may pick a different segmentation of equal score "
            "(seen on runs of spaces)"
        )
    if not proto.trainer_spec.byte_fallback:
        caveats.append("no byte fallback: characters outside the vocabulary become <unk> and cannot be decoded")
    if any(p.type == kinds.USER_DEFINED for p in proto.pieces):
        caveats.append("user-defined pieces: transformers splits text around them before adding the dummy prefix")
    return caveats


def sentencepiece_to_hf(model_file: str | os.PathLike[str], *, add_bos: bool) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the SentencePiece model ``model_file``.

    Built from the model's own pieces rather than by transformers' converter, whose output changes between
    versions and drops the dummy prefix of text that starts with a space. BPE: the merges are every split of a piece
    into two pieces, ranked by the piece's score (SentencePiece merges the adjacent pair whose join scores highest);
    byte fallback and unknown-token fusing as SentencePiece. Normaliser: the model's character map (none under
    ``identity``) and whitespace collapsing if it has them, then the dummy prefix "▁" and spaces as "▁"; no
    pre-tokenizer, so the whole text is one word, as in SentencePiece. Decoder: "▁" back to spaces, byte pieces to
    UTF-8, one leading space (the dummy prefix) removed. ``add_bos`` prepends BOS in ``encode(...,
    add_special_tokens=True)``, as the training data did when prepared with BOS; EOS is never added.

    For a model trained with ``normalization="identity"`` and byte fallback, ids and decoded text equal
    SentencePiece's for every string, except that text spelling a special token ("<s>", "</s>", "<unk>") is read
    as that token, as LLaMA's Hugging Face tokenizer does, where SentencePiece encodes the characters. Other models
    convert with the limits :func:`hf_conversion_caveats` names.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE, Unigram

    proto = _read_model_proto(model_file)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if not proto.pieces:
        raise DataError(f"{model_file} holds no pieces; is it a SentencePiece model?")
    if trainer.treat_whitespace_as_suffix:
        raise DataError(f"{model_file}: SentencePiece models with whitespace as suffix cannot be exported")
    kinds = proto.SentencePiece
    pieces = list(proto.pieces)
    ids = {p.piece: i for i, p in enumerate(pieces)}
    unk = pieces[trainer.unk_id].piece
    if trainer.model_type == trainer.BPE:
        ranked = []
        for i, p in enumerate(pieces):
            if p.type != kinds.NORMAL:
                continue
            for cut in range(1, len(p.piece)):
                left, right = ids.get(p.piece[:cut]), ids.get(p.piece[cut:])
                if left is not None and right is not None and kinds.NORMAL == pieces[left].type == pieces[right].type:
                    ranked.append((-p.score, i, left, right))
        ranked.sort()
        merges = [(pieces[left].piece, pieces[right].piece) for _, _, left, right in ranked]
        model = BPE(ids, merges, unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == trainer.UNIGRAM:
        scored = [
            (p.piece, p.score if p.type in (kinds.NORMAL, kinds.USER_DEFINED) else _UNMATCHABLE_SCORE) for p in pieces
        ]
        model = Unigram(scored, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise DataError(f"{model_file}: only BPE and unigram SentencePiece models can be exported")
    tok = Tokenizer(model)
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # always, also before a leading space (Metaspace would skip it)
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        undo.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(undo)
    tok.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in pieces
            if p.type in (kinds.CONTROL, kinds.UNKNOWN)
        ]
    )
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in pieces if p.type == kinds.USER_DEFINED])
    if add_bos:
        if not 0 <= trainer.bos_id < len(pieces):
            raise DataError(f"{model_file} has no BOS piece, but the data was prepared with BOS")
        bos = pieces[trainer.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)]
        )
    return tok
