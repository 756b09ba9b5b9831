"""Tokenizer normalisation and the Hugging Face export: the default tokenizer keeps every character (newlines,
tabs, runs of spaces, accents as written), the ``nfkc`` flag keeps the earlier behaviour, and the exported
``AutoTokenizer`` gives SentencePiece's ids and text back, through the real export function."""

from __future__ import annotations

import importlib.util
import json
import sysconfig
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from megatron_pept.data.tokenizer import (
    NORMALIZATIONS,
    tokenizer_sentences,
    train_sentencepiece,
    train_tokenizer_from_sources,
)
from megatron_pept.errors import DataError

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "",
    " ",
    "   ",
    "Hello world.",
    "a\nb",
    "\n",
    "\n\n",
    "first line\n\nsecond paragraph\n",
    "windows\r\nline endings\r\n",
    "a\tb",
    "\tindented\n\t\ttwice",
    "a  b   c    d",
    " one leading space",
    "    four leading spaces",
    "trailing space ",
    "trailing spaces   \n",
    "12345",
    "pi is 3.14159 and the year 2024",
    "café, niño, Ærø",
    "e\u0301 n\u0303 a\u0308: combining accents",
    "ﬁne ﬁsh ﬂow",  # ligatures NFKC would rewrite to "fi", "fl"
    "１２３ ＡＢＣ full width",  # NFKC would rewrite to "123 ABC"
    "中文字符，日本語のテキスト",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧",
    "def f(x):\n    return x + 1\n",
    "a literal <0x41> is text, not a byte",
    "spaced out , punctuation . it 's kept !",  # transformers' decode clean-up would join these
]
PLAIN = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "return value", "print the result"]


def stdlib_sources(start: int, num_bytes: int) -> list[str]:
    """Python standard library modules (real code and prose with newlines, indentation and digits), read from
    disk in a fixed order, skipping the first ``start`` files."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[start:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text.encode())
        if total >= num_bytes:
            break
    return docs


def numbers_document(num_lines: int) -> str:
    """Lines full of many-digit numbers, where a tokenizer that may join digits learns pieces like "00"."""
    return "\n".join(
        f"Invoice {1000 + i}: {i * 37 % 997} items at {i * 7919 % 10_000}.{i % 100:02d}" for i in range(num_lines)
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    docs = [*stdlib_sources(0, 300_000), numbers_document(2000)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def train(corpus: Path, folder: Path, **kw) -> spm.SentencePieceProcessor:
    tok = train_tokenizer_from_sources([str(corpus)], output_dir=folder, vocab_size=400, **kw)
    return tok.processor


@pytest.fixture(scope="module")
def identity_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "identity"
    train(corpus, folder)  # the defaults
    return folder


@pytest.fixture(scope="module")
def nfkc_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "nfkc"
    train(corpus, folder, normalization="nfkc")
    return folder


def processor(folder: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def proto(folder: Path) -> sentencepiece_model_pb2.ModelProto:
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((folder / "tokenizer.model").read_bytes())
    return model


def export(tokenizer_dir: Path, out: Path, *, bos_id: int | None):
    """The exported tokenizer as transformers loads it, written by the export's own function."""
    transformers = pytest.importorskip("transformers")
    from megatron_pept.checkpoint.hf_export import _save_tokenizer

    out.mkdir()
    _save_tokenizer(transformers, tokenizer_dir / "tokenizer.model", out, bos_id=bos_id)
    return transformers.AutoTokenizer.from_pretrained(out)


def test_defaults_are_llamas_and_recorded(identity_dir: Path) -> None:
    meta = json.loads((identity_dir / "tokenizer_meta.json").read_text())
    assert meta["normalization"] == "identity"
    assert meta["normalizer"] == {
        "name": "identity",
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,
        "escape_whitespaces": True,
    }
    assert meta["split_digits"] and meta["allow_whitespace_only_pieces"] and meta["byte_fallback"]
    spec = proto(identity_dir).trainer_spec
    assert spec.split_digits and spec.allow_whitespace_only_pieces and spec.byte_fallback
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)


@pytest.mark.parametrize("text", TEXTS)
def test_default_tokenizer_keeps_the_text(identity_dir: Path, text: str) -> None:
    sp = processor(identity_dir)
    assert sp.decode(sp.encode(text)) == text
    assert 0 not in sp.encode(text)  # nothing is <unk>


def test_default_tokenizer_keeps_whitespace_and_digits_apart(identity_dir: Path) -> None:
    sp = processor(identity_dir)
    space = sp.encode("a b")
    assert len({tuple(sp.encode(t)) for t in ("a b", "a\nb", "a\tb", "a  b", "a\r\nb")}) == 5
    assert sp.encode("a\nb", out_type=str) == ["▁a", "<0x0A>", "b"]  # LLaMA's byte piece for a newline
    assert sp.encode("\n\n", out_type=str).count("<0x0A>") == 2
    assert sp.piece_to_id("<0x0A>") in sp.encode("a\nb") and sp.piece_to_id("<0x0A>") not in space
    assert sp.encode(" x") != sp.encode("x") and sp.encode("x ") != sp.encode("x")
    digits = [p for p in sp.encode("12345", out_type=str) if p != "▁"]
    assert digits == ["1", "2", "3", "4", "5"]
    text_pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i))]
    assert any(c.isdigit() for p in text_pieces for c in p)
    assert all(sum(c.isdigit() for c in p) <= 1 for p in text_pieces)  # no piece holds two digits
    assert any(len(p) > 1 and set(p) == {"▁"} for p in text_pieces)  # runs of spaces (indentation) are pieces
    assert sp.encode("ﬁ") != sp.encode("fi") and sp.encode("１") != sp.encode("1")


def test_nfkc_flag_keeps_the_earlier_behaviour(nfkc_dir: Path) -> None:
    sp = processor(nfkc_dir)
    for variant in ("a\nb", "a\tb", "a    b", "  a b  ", "a\r\nb"):
        assert sp.encode(variant) == sp.encode("a b"), variant  # newlines and tabs read as one space
    assert sp.decode(sp.encode("a\nb")) == "a b"
    assert sp.encode("ﬁne １２") == sp.encode("fine 12")  # NFKC
    meta = json.loads((nfkc_dir / "tokenizer_meta.json").read_text())
    assert meta["normalization"] == "nfkc" and meta["normalizer"]["name"] == "nmt_nfkc"
    assert meta["normalizer"]["remove_extra_whitespaces"] and not meta["split_digits"]
    model = proto(nfkc_dir)
    # SentencePiece's own defaults, set by nobody: the model file is the one earlier versions wrote.
    for field in ("split_digits", "allow_whitespace_only_pieces", "required_chars"):
        assert not model.trainer_spec.HasField(field), field
    assert model.normalizer_spec.name == "nmt_nfkc" and model.normalizer_spec.remove_extra_whitespaces


def test_training_sentences_keep_whitespace() -> None:
    doc = "  a\tb  \n\n    c  d\r\n"
    assert list(tokenizer_sentences([doc])) == ["  a\tb  ", "    c  d\r"]
    assert list(tokenizer_sentences([doc], normalization="nfkc")) == ["a\tb", "c  d"]
    assert list(tokenizer_sentences(["x" * 10], max_chars=4)) == ["xxxx", "xxxx", "xx"]


def test_without_byte_fallback_a_newline_is_still_a_piece(corpus: Path, tmp_path: Path) -> None:
    sp = train(corpus, tmp_path / "nobytes", byte_fallback=False)
    assert sp.piece_to_id("<0x0A>") == 0  # no byte pieces
    assert "\n" in sp.encode("a\nb", out_type=str)
    assert sp.decode(sp.encode("def f():\n    return 1\n")) == "def f():\n    return 1\n"


def test_normalization_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="must be one of identity, nfkc"):
        train_sentencepiece(["some text"], output_dir=tmp_path / "t", vocab_size=300, normalization="nfc")
    assert not (tmp_path / "t").exists()
    spec = importlib.util.spec_from_file_location("train_tokenizer_tool", REPO / "tools" / "train_tokenizer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    action = next(a for a in tool.build_parser()._actions if a.dest == "normalization")
    assert tuple(action.choices) == NORMALIZATIONS and action.default == "identity"


def test_export_encodes_like_sentencepiece(identity_dir: Path, tmp_path: Path) -> None:
    sp = processor(identity_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact export warns about nothing
        hf = export(identity_dir, tmp_path / "bos", bos_id=1)
    config = json.loads((tmp_path / "bos" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class transformers 4.x knows too
    assert (tmp_path / "bos" / "tokenizer.json").is_file()
    assert (tmp_path / "bos" / "tokenizer.model").read_bytes() == (identity_dir / "tokenizer.model").read_bytes()
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    held_out = stdlib_sources(100, 200_000)  # modules the tokenizer never saw (it read the first 300 KB)
    assert len(held_out) > 3
    for text in TEXTS + held_out:
        ids = sp.encode(text)
        assert hf(text)["input_ids"] == [1] + ids, text[:60]  # BOS, as the data was prepared with it
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:60]
        assert hf.decode([1] + ids, skip_special_tokens=True) == text, text[:60]
        assert hf.decode(ids) == sp.decode(ids) == text, text[:60]
    no_bos = export(identity_dir, tmp_path / "nobos", bos_id=None)
    for text in TEXTS:
        assert no_bos(text)["input_ids"] == sp.encode(text), text


def test_nfkc_export_warns_and_matches_plain_text(nfkc_dir: Path, tmp_path: Path) -> None:
    sp = processor(nfkc_dir)
    with pytest.warns(UserWarning, match="normalises text"):
        hf = export(nfkc_dir, tmp_path / "hf", bos_id=None)
    for text in PLAIN + ["a\nb", "  two  spaces  ", "tab\there"]:
        assert hf(text)["input_ids"] == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert hf.decode(hf("a\n\nb")["input_ids"]) == "a b"  # the normaliser's changes cannot be undone


def test_unigram_export_matches_on_plain_text(corpus: Path, tmp_path: Path) -> None:
    sp = train(corpus, tmp_path / "uni", model_type="unigram")
    with pytest.warns(UserWarning, match="unigram"):
        hf = export(tmp_path / "uni", tmp_path / "hf", bos_id=None)
    for text in PLAIN + ["a\nb", "12345", "café 😀", "", "a literal <0x41> is text"]:
        assert hf(text)["input_ids"] == sp.encode(text), text
        assert hf.decode(hf(text)["input_ids"]) == text
