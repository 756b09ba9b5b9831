"""Text sources: ``.txt`` (a document per line), ``.jsonl``/``.json`` (a text field), ``.parquet``, or a Hugging
Face ``datasets`` name, a folder saved with ``save_to_disk``, or a loading-script folder.

``.txt`` and ``.jsonl``/``.json`` files are read here, line by line, so a record that cannot be read (invalid
UTF-8, a NUL byte, a malformed JSON line, a missing or non-text field) is named by file and line number, and can
be skipped and counted instead (:class:`BadRecords`). They yield the documents ``datasets``' ``text`` and
``json`` builders yield for the same valid file (universal newlines for text, a leading BOM dropped for JSON, a
file that starts with ``[`` read as one JSON array). Everything else is read through ``datasets`` in streaming
mode. Either way a corpus larger than memory (or disk cache) is read once, in a fixed order, without an Arrow
copy being written first.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from megatron_pept.errors import DataError

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSource:
    """One input as given on the command line, resolved to a ``datasets`` builder."""

    spec: str
    builder: str  # "text" | "json" | "parquet" | "disk" | "hub"
    files: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.spec} ({self.builder})"


def _expand(spec: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        return [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
    return [Path(spec)]


def resolve_source(spec: str, *, allow_hub: bool = True) -> TextSource:
    """Classify one ``--input`` argument; a missing file is a :class:`DataError`."""
    paths = _expand(spec)
    if not paths:
        raise DataError(f"input pattern {spec!r} matches no file")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file():
            return TextSource(spec=spec, builder="disk", files=(str(folder),))
        files = sorted(p for p in folder.rglob("*") if p.suffix in FILE_BUILDERS and p.is_file())
        if not files:
            raise DataError(f"input folder {folder} holds no .txt, .jsonl, .json or .parquet file")
        paths = files
    suffixes = {p.suffix for p in paths}
    if all(p.exists() for p in paths):
        if len(suffixes) > 1 or next(iter(suffixes)) not in FILE_BUILDERS:
            raise DataError(
                f"input {spec!r} has files of type {', '.join(sorted(suffixes))}; use .txt, .jsonl, .json or "
                ".parquet, one type per --input"
            )
        for p in paths:
            if p.stat().st_size == 0:
                raise DataError(f"input file {p} is empty")
        return TextSource(spec=spec, builder=FILE_BUILDERS[paths[0].suffix], files=tuple(map(str, paths)))
    if Path(spec).suffix in FILE_BUILDERS or spec.startswith((".", "/")) or not allow_hub:
        raise DataError(f"input {spec!r} does not exist")
    return TextSource(spec=spec, builder="hub")  # a datasets name such as "allenai/c4"


@dataclass
class BadRecords:
    """What reading does with a record it cannot use: stop with one line naming the file and line (the default),
    or, with ``skip``, count it (``count``; the first few are logged and kept in ``examples``) and go on."""

    skip: bool = False
    hint: str = "fix or remove it"
    """The way out the one-line error offers (a tool adds its own option, e.g. --skip-bad-records)."""
    count: int = 0
    examples: list[str] = field(default_factory=list)
    logged: int = 10

    def __call__(self, where: str, problem: str) -> None:
        message = f"{where} {problem}"
        if not self.skip:
            raise DataError(f"{message}; {self.hint}")
        self.count += 1
        if len(self.examples) < self.logged:
            self.examples.append(message)
            logger.warning("skipping a bad record: %s", message)


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"is not valid UTF-8 (byte {raw[err.start : err.start + 1]!r} at column {err.start + 1}; a binary file?)"


def _json_problem(err: json.JSONDecodeError) -> str:
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def _text_lines(path: str, bad: BadRecords) -> Iterator[str]:
    """The lines of a text file as ``datasets``' text builder splits them (it reads in text mode, where CR LF and a
    lone CR end a line too); a line that is not UTF-8 text is a bad record."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                bad(f"{path}: line {number}", "holds a NUL byte (a binary or UTF-16 file?)")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad(f"{path}: line {number}", _not_utf8(raw, err))
                continue
            yield from text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _field_text(record: Any, *, text_field: str, where: str, bad: BadRecords, strings: bool = False) -> str | None:
    """The text of one JSON record, or None after reporting why it has none (``strings``: a string is a record of
    its own, as datasets reads a JSON array of strings)."""
    if strings and isinstance(record, str) and text_field == "text":
        value = record
    elif not isinstance(record, dict):
        bad(where, f"is a JSON {type(record).__name__}, not an object with a '{text_field}' field")
        return None
    elif text_field not in record:
        bad(
            where,
            f"has no field '{text_field}' (its fields: {', '.join(record) or 'none'}); choose one with --text-field",
        )
        return None
    else:
        value = record[text_field]
    if not isinstance(value, str):
        bad(where, f"has a field '{text_field}' that is {type(value).__name__}, not text")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        bad(where, f"has a field '{text_field}' with a lone surrogate escape (\\ud800-\\udfff): not valid Unicode text")
        return None
    return value


def _json_array(path: str, f: BinaryIO, *, text_field: str, bad: BadRecords) -> Iterator[str]:
    """A file that is one JSON array (of objects, or of strings): read whole, as ``datasets`` does. A syntax error
    or a bad byte stops the whole file (nothing after it can be read); a bad item is a bad record."""
    raw = f.read()
    try:
        items = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} {_not_utf8(raw, err)}; a JSON array file cannot be read past it: fix it"
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: line {err.lineno} is not valid JSON ({_json_problem(err)}); a JSON array file cannot be "
            "read past it: fix it"
        ) from None
    if not isinstance(items, list):
        raise DataError(
            f"{path} is a JSON {type(items).__name__}; give a JSON array or JSON Lines (an object per line)"
        )
    for number, item in enumerate(items):
        text = _field_text(item, text_field=text_field, where=f"{path}: item {number}", bad=bad, strings=True)
        if text is not None:
            yield text


def _json_texts(path: str, *, text_field: str, bad: BadRecords) -> Iterator[str]:
    """The ``text_field`` of each record of a JSON Lines file (blank lines are no record), or of a JSON array."""
    with open(path, "rb") as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            f.seek(0)
        if f.read(1) == b"[":
            f.seek(f.tell() - 1)
            yield from _json_array(path, f, text_field=text_field, bad=bad)
            return
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            where = f"{path}: line {number}"
            try:  # without its line end, which an unterminated string would report as a control character
                record = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
            except UnicodeDecodeError as err:
                bad(where, _not_utf8(raw, err))
                continue
            except json.JSONDecodeError as err:
                bad(where, f"is not valid JSON ({_json_problem(err)})")
                continue
            text = _field_text(record, text_field=text_field, where=where, bad=bad)
            if text is not None:
                yield text


def iter_documents(
    source: TextSource, *, text_field: str = "text", split: str = "train", bad_records: BadRecords | None = None
) -> Iterator[str]:
    """The non-empty documents of one source in their stored order; ``bad_records`` decides what happens to a
    record of a text or JSON file that cannot be read (default: one :class:`DataError` naming it)."""
    bad = bad_records if bad_records is not None else BadRecords()
    if source.builder in ("text", "json"):
        for path in source.files:
            if source.builder == "text":
                texts = _text_lines(path, bad)
            else:
                texts = _json_texts(path, text_field=text_field, bad=bad)
            for text in texts:
                if text.strip():
                    yield text
        return
    try:
        yield from _iter_documents(source, text_field=text_field, split=split)
    except RuntimeError as err:
        # datasets keeps a streaming dataset's epoch in torch shared memory whenever torch is installed, so a
        # read-only or missing /dev/shm fails every read with a torch traceback
        if "shared memory" not in str(err):
            raise
        raise DataError(
            f"reading {source.spec} needs a writable /dev/shm (datasets keeps a counter in torch shared memory): "
            f"{str(err).splitlines()[0]}; make /dev/shm writable (docker run --shm-size=1g, or --ipc=host)"
        ) from None


def _iter_documents(source: TextSource, *, text_field: str, split: str) -> Iterator[str]:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if source.builder == "disk":
        loaded = datasets.load_from_disk(source.files[0])
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source.spec} has no split '{split}' (it has {', '.join(loaded)})")
            loaded = loaded[split]
        stream = loaded.to_iterable_dataset()
    elif source.builder == "hub":
        try:
            stream = datasets.load_dataset(source.spec, split=split, streaming=True)
        except Exception as err:  # offline, unknown name, gated dataset ...
            raise DataError(
                f"input {source.spec!r} is neither a local file or folder nor a loadable datasets name "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
            ) from None
    else:
        stream = datasets.load_dataset(source.builder, data_files=list(source.files), split="train", streaming=True)
    field = "text" if source.builder == "text" else text_field
    for i, row in enumerate(stream):
        if field not in row:
            raise DataError(
                f"{source.spec} has no field '{field}' (its fields: {', '.join(row)}); choose one with --text-field"
            )
        text = row[field]
        if not isinstance(text, str):
            raise DataError(f"{source.spec}: field '{field}' of row {i} is {type(text).__name__}, not text")
        if text.strip():
            yield text


def iter_corpus(
    specs: list[str],
    *,
    text_field: str = "text",
    split: str = "train",
    skip: int = 0,
    bad_records: BadRecords | None = None,
) -> Iterator[str]:
    """Documents of several sources, one after another, skipping the first ``skip`` non-empty ones (a bad record
    is no document: it is reported or skipped as ``bad_records`` says, see :func:`iter_documents`)."""
    if not specs:
        raise DataError("no input given; pass at least one --input")
    sources = [resolve_source(s) for s in specs]
    seen = 0
    for source in sources:
        for text in iter_documents(source, text_field=text_field, split=split, bad_records=bad_records):
            if seen >= skip:
                yield text
            seen += 1
