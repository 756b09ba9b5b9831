"""On-disk token shards: ``*.bin`` files of little-endian uint16/uint32 plus one ``index.json``.

Layout of a data folder::

    index.json            format, dtype, vocab size, special ids, tokenizer (file, sha256), and per split the
                          documents, tokens and shards (file, tokens, documents, sha256, max_id)
    tokenizer.model       copy of the tokenizer the tokens came from (tokenizer.json for a Hugging Face one)
    train-00000.bin ...   documents back to back, each followed by EOS (and preceded by BOS if configured)
    val-00000.bin ...

A shard is written under a temporary name and renamed only when complete, and ``index.json`` is written last,
so a folder whose index exists is complete; a folder without one is an interrupted preparation.

Every file the index names (``tokenizer.file``, each shard's ``file``) is a name inside the folder: no absolute
path, no ``..``, no symlink that leads out of it. :func:`read_index` refuses any other, since the trainer reads
those files and copies the tokenizer into every checkpoint under the same name. A shard's ``max_id`` is its
largest token id, so a run can refuse ids its model has no embedding for before it starts; indexes written
before it was recorded lack it and are still read (see :func:`largest_id`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_pept.errors import DataError
from megatron_pept.safe_paths import outside_reason

INDEX_FILE = "index.json"
FORMAT_NAME = "megatron_pept.token_shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(f"vocabulary of {vocab_size} ids does not fit in uint32 shards")


@dataclass
class ShardInfo:
    file: str
    tokens: int
    documents: int
    sha256: str
    max_id: int | None = None
    """The largest token id in the shard; None in an index written before it was recorded."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class SplitInfo:
    documents: int = 0
    tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class DataIndex:
    """The parsed ``index.json`` of a shard folder."""

    root: Path
    dtype: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    extra: dict[str, Any] = field(default_factory=dict)
    tokenizer_file: str = "tokenizer.model"
    """The tokenizer's file in the folder: ``tokenizer.model`` (SentencePiece) or ``tokenizer.json`` (Hugging Face)."""

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "tokenizer": {"file": self.tokenizer_file, "sha256": self.tokenizer_sha256},
            "splits": {
                name: {
                    "documents": s.documents,
                    "tokens": s.tokens,
                    "shards": [sh.to_json() for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
            **self.extra,
        }

    def write(self) -> None:
        tmp = self.root / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, self.root / INDEX_FILE)


def _shard_info(entry: Any) -> ShardInfo:
    if not isinstance(entry, dict):
        raise TypeError(f"a shard entry is {type(entry).__name__}, not an object")
    shard = ShardInfo(**entry)
    shard.tokens, shard.documents = int(shard.tokens), int(shard.documents)
    if shard.max_id is not None:
        shard.max_id = int(shard.max_id)
    return shard


def read_index(root: str | os.PathLike[str]) -> DataIndex:
    """Parse and sanity-check a folder's index; every problem is one :class:`DataError` line.

    Every file it names must be inside ``root`` (:func:`outside_reason`): the trainer reads those files and
    copies the tokenizer into each checkpoint under its recorded name, so a name such as ``../../x`` would write
    outside the run."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data path {root} does not exist; make it with megatron-pept-prepare-data (tools/prepare_data.py in a "
            "checkout)"
        )
    if not root.is_dir():
        raise DataError(
            f"data path {root} is a file, not a folder: point it at the folder megatron-pept-prepare-data --output "
            "wrote (the one holding index.json)"
        )
    path = root / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{root} has no {INDEX_FILE}: it is not a prepared shard folder (or its preparation did not finish); "
            "run megatron-pept-prepare-data --output on it (tools/prepare_data.py in a checkout)"
        )
    try:
        content = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        raw = json.loads(content)  # bytes: invalid UTF-8 is a ValueError here, reported as malformed
        if not isinstance(raw, dict):
            raise DataError(
                f"{path} holds a JSON {type(raw).__name__}, not an object: it is not a megatron_pept shard index; "
                "re-run megatron-pept-prepare-data (tools/prepare_data.py in a checkout)"
            )
        if raw.get("format") != FORMAT_NAME:
            raise DataError(f"{path} is not a megatron_pept shard index (format {raw.get('format')!r})")
        if raw.get("version") != FORMAT_VERSION:
            raise DataError(f"{path} has index version {raw.get('version')}; this build reads {FORMAT_VERSION}")
        splits = {
            name: SplitInfo(
                documents=int(s["documents"]),
                tokens=int(s["tokens"]),
                shards=[_shard_info(sh) for sh in s["shards"]],
            )
            for name, s in raw["splits"].items()
        }
        known = {"format", "version", "dtype", "vocab_size", "eos_id", "bos_id", "tokenizer", "splits"}
        index = DataIndex(
            root=root,
            dtype=str(raw["dtype"]),
            vocab_size=int(raw["vocab_size"]),
            eos_id=int(raw["eos_id"]),
            bos_id=None if raw.get("bos_id") is None else int(raw["bos_id"]),
            tokenizer_sha256=str(raw["tokenizer"]["sha256"]),
            tokenizer_file=raw["tokenizer"].get("file", "tokenizer.model"),
            splits=splits,
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"{path} is malformed ({type(err).__name__}: {err}); re-run megatron-pept-prepare-data "
            "(tools/prepare_data.py in a checkout)"
        ) from None
    if index.dtype not in ("<u2", "<u4", "uint16", "uint32"):
        raise DataError(f"{path}: unsupported token dtype {index.dtype!r} (uint16 or uint32)")
    named = [("tokenizer.file", index.tokenizer_file)]
    named += [
        (f"splits.{split}.shards[{i}].file", sh.file) for split, s in splits.items() for i, sh in enumerate(s.shards)
    ]
    for entry, name in named:
        reason = outside_reason(root, name)
        if reason is not None:
            raise DataError(
                f"{path}: {entry} {name!r} {reason}; an index may only name files inside its own folder: copy the "
                "file into the folder and name it there, or re-run megatron-pept-prepare-data"
            )
    return index


class VerifiedShards:
    """The checksum cache of a run: shards (by resolved path) whose size, modification time and sha256 were checked,
    and the largest token id of shards whose index does not record it (:func:`largest_id`).

    Loaded from ``path`` (a JSON file) if it exists; :meth:`save` writes it back (atomically) when something was
    added, so a caller can check first and write only once it has accepted the run."""

    MAX_IDS = "max_ids"  # the key of the largest-id entries in the file; never a path (those are absolute)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[str, list] = {}
        self.max_ids: dict[str, list] = {}
        self.changed = False
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
                max_ids = self.entries.pop(self.MAX_IDS, {})
                self.max_ids = max_ids if isinstance(max_ids, dict) else {}
            except (OSError, json.JSONDecodeError, AttributeError):
                self.entries, self.max_ids = {}, {}

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.entries, **({self.MAX_IDS: self.max_ids} if self.max_ids else {})}))
        os.replace(tmp, self.path)
        self.changed = False


def largest_id(index: DataIndex, *, split: str, cache: VerifiedShards | None = None) -> int:
    """The largest token id in ``split`` of ``index`` (-1 if it holds no token).

    Taken from each shard's ``max_id`` in the index. A shard of an index written before ``max_id`` was recorded is
    read instead: a numpy max over its memory map, which runs about as fast as the disk delivers the bytes (the
    same reading a checksum check does once). With ``cache``, that result is remembered by the shard's resolved
    path, size and modification time, so a resumed run does not read the shard again."""
    largest = -1
    for shard in index.splits[split].shards:
        if shard.max_id is not None:
            largest = max(largest, shard.max_id)
            continue
        if shard.tokens == 0:
            continue
        path = index.root / shard.file
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        cached = cache.max_ids.get(key) if cache is not None else None
        if isinstance(cached, list) and len(cached) == 3 and cached[:2] == stamp:
            value = int(cached[2])
        else:
            value = int(open_shard(index, shard).max())
            if cache is not None:
                cache.max_ids[key], cache.changed = [*stamp, value], True
        largest = max(largest, value)
    return largest


def verify_shards(
    index: DataIndex,
    *,
    split: str,
    checksums: bool = False,
    cache: str | os.PathLike[str] | VerifiedShards | None = None,
) -> None:
    """Check that each shard of ``split`` exists with the recorded size and, optionally, sha256.

    With ``cache``, shards whose path, size and modification time match an earlier successful check are not
    hashed again, so a resumed run does not re-read terabytes. A path is read and written back here; a
    :class:`VerifiedShards` is only updated (its owner saves it).
    """
    itemsize = index.np_dtype.itemsize
    verified = None
    if checksums and cache is not None:
        verified = cache if isinstance(cache, VerifiedShards) else VerifiedShards(cache)
    for shard in index.splits[split].shards:
        path = index.root / shard.file
        if not path.is_file():
            raise DataError(
                f"shard {path} listed in the index is missing; re-run megatron-pept-prepare-data "
                "(tools/prepare_data.py in a checkout)"
            )
        stat = path.stat()
        if stat.st_size != shard.tokens * itemsize:
            raise DataError(
                f"shard {path} has {stat.st_size} bytes but the index records {shard.tokens} tokens "
                f"({shard.tokens * itemsize} bytes): it is truncated or was overwritten"
            )
        if not checksums:
            continue
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, shard.sha256]
        if verified is not None and verified.entries.get(key) == stamp:
            continue
        if sha256_file(path) != shard.sha256:
            raise DataError(f"shard {path} fails its sha256 check: the file is corrupt; re-create it")
        if verified is not None:
            verified.entries[key], verified.changed = stamp, True
    if verified is not None and not isinstance(cache, VerifiedShards):
        verified.save()


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Appends documents to numbered shards of one split; each shard closes at a document boundary.

    Shards are written to ``.<name>.tmp`` and renamed when complete, with their sha256 computed on the way.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        start_index: int = 0,
    ) -> None:
        if shard_tokens < 1:
            raise DataError(f"shard size must be >= 1 token; got {shard_tokens}")
        self.root = Path(root)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.next_index = start_index
        self.info = SplitInfo()
        self._buffer: list[np.ndarray] = []
        self._buffered_tokens = 0
        self._buffered_docs = 0

    def adopt(self, shard: ShardInfo) -> None:
        """Count a shard finished by an earlier (interrupted) run as written (an earlier version did not record its
        largest id: it is read from the shard)."""
        path = self.root / shard.file
        if shard.max_id is None and shard.tokens > 0 and path.is_file():
            shard.max_id = int(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard.tokens,)).max())
        self.info.shards.append(shard)
        self.info.tokens += shard.tokens
        self.info.documents += shard.documents
        self.next_index += 1

    def add(self, ids: np.ndarray | list[int]) -> bool:
        """Add one document's ids (separators already included); True when this closed a shard."""
        arr = np.asarray(ids, dtype=self.dtype)
        self._buffer.append(arr)
        self._buffered_tokens += arr.size
        self._buffered_docs += 1
        if self._buffered_tokens >= self.shard_tokens:
            return self.flush()
        return False

    def flush(self) -> bool:
        if not self._buffer:
            return False
        data = np.concatenate(self._buffer)
        name = f"{self.split}-{self.next_index:05d}.bin"
        tmp = self.root / f".{name}.tmp"
        payload = data.astype(self.dtype, copy=False).tobytes()
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        self.info.shards.append(
            ShardInfo(
                file=name,
                tokens=int(data.size),
                documents=self._buffered_docs,
                sha256=hashlib.sha256(payload).hexdigest(),
                max_id=int(data.max()),
            )
        )
        self.info.tokens += int(data.size)
        self.info.documents += self._buffered_docs
        self.next_index += 1
        self._buffer, self._buffered_tokens, self._buffered_docs = [], 0, 0
        return True

    def close(self) -> SplitInfo:
        self.flush()
        return self.info


def open_shard(index: DataIndex, shard: ShardInfo) -> np.memmap:
    return np.memmap(index.root / shard.file, dtype=index.np_dtype, mode="r", shape=(shard.tokens,))
