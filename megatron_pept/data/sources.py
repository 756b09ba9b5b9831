"""Text sources: ``.txt`` (a document per line), ``.jsonl``/``.json`` (a text field), ``.parquet``, or a Hugging
Face ``datasets`` name, a folder saved with ``save_to_disk``, or a loading-script folder.

Everything is read through ``datasets`` in streaming mode, so a corpus larger than memory (or disk cache) is
read once, in a fixed order, without an Arrow copy being written first.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_pept.errors import DataError

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


def iter_documents(source: TextSource, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The non-empty documents of one source in their stored order."""
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


def iter_corpus(specs: list[str], *, text_field: str = "text", split: str = "train", skip: int = 0) -> Iterator[str]:
    """Documents of several sources, one after another, skipping the first ``skip`` non-empty ones."""
    if not specs:
        raise DataError("no input given; pass at least one --input")
    sources = [resolve_source(s) for s in specs]
    seen = 0
    for source in sources:
        for text in iter_documents(source, text_field=text_field, split=split):
            if seen >= skip:
                yield text
            seen += 1
