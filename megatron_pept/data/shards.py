"""On-disk token shards: ``*.bin`` files of little-endian uint16/uint32 plus one ``index.json``.

Layout of a data folder::

    index.json            format, dtype, vocab size, special ids, tokenizer checksum, and per split the
                          documents, tokens and shards (file, tokens, documents, sha256)
    tokenizer.model       copy of the tokenizer the tokens came from (tokenizer.json for a Hugging Face one)
    train-00000.bin ...   documents back to back, each followed by EOS (and preceded by BOS if configured)
    val-00000.bin ...

A shard is written under a temporary name and renamed only when complete, and ``index.json`` is written last,
so a folder whose index exists is complete; a folder without one is an interrupted preparation.
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
                    "shards": [vars(sh) for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
            **self.extra,
        }

    def write(self) -> None:
        tmp = self.root / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, self.root / INDEX_FILE)


def read_index(root: str | os.PathLike[str]) -> DataIndex:
    """Parse and sanity-check a folder's index; every problem is one :class:`DataError` line."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data path {root} does not exist; make it with megatron-pept-prepare-data (tools/prepare_data.py in a "
            "checkout)"
        )
    path = root / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{root} has no {INDEX_FILE}: it is not a prepared shard folder (or its preparation did not finish); "
            "run megatron-pept-prepare-data --output on it (tools/prepare_data.py in a checkout)"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT_NAME:
            raise DataError(f"{path} is not a megatron_pept shard index (format {raw.get('format')!r})")
        if raw.get("version") != FORMAT_VERSION:
            raise DataError(f"{path} has index version {raw.get('version')}; this build reads {FORMAT_VERSION}")
        splits = {
            name: SplitInfo(
                documents=int(s["documents"]),
                tokens=int(s["tokens"]),
                shards=[ShardInfo(**sh) for sh in s["shards"]],
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
            tokenizer_file=str(raw["tokenizer"].get("file", "tokenizer.model")),
            splits=splits,
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"{path} is malformed ({type(err).__name__}: {err}); re-run megatron-pept-prepare-data "
            "(tools/prepare_data.py in a checkout)"
        ) from None
    if index.dtype not in ("<u2", "<u4", "uint16", "uint32"):
        raise DataError(f"{path}: unsupported token dtype {index.dtype!r} (uint16 or uint32)")
    return index


class VerifiedShards:
    """The checksum cache of a run: shards (by resolved path) whose size, modification time and sha256 were checked.

    Loaded from ``path`` (a JSON file) if it exists; :meth:`save` writes it back (atomically) when something was
    added, so a caller can check first and write only once it has accepted the run."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)
        self.changed = False


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
        """Count a shard finished by an earlier (interrupted) run as written."""
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
