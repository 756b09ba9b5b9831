"""Reading DCP checkpoints without running code from them.

``torch.distributed.checkpoint``'s ``FileSystemReader.read_metadata`` unpickles ``state/.metadata`` with plain
``pickle``, so a crafted ``.metadata`` runs any command it likes as soon as a run resumes, an export reads it or
a tool inspects it. Every path of this project that opens a DCP checkpoint goes through this module instead:

* :func:`read_metadata` unpickles ``.metadata`` with an unpickler that knows only the classes DCP writes there
  (its metadata dataclasses, ``torch.Size``, dtypes, layouts, paths) and refuses to set attributes on anything
  but instances of those classes; then checks the result's shape: every entry a tensor (this project saves
  nothing else; DCP's loader would ``torch.load`` a bytes entry with ``weights_only=False``), every storage file
  a plain name inside the folder;
* :func:`load` runs ``dcp.load`` with a reader that hands DCP that checked metadata (DCP reads the tensor data
  itself with ``torch.load(weights_only=True)``) and a planner that refuses non-tensor entries.

A file that is refused, damaged or truncated is one :class:`~megatron_pept.errors.UserError` naming it.
"""

from __future__ import annotations

import copy
import io
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megatron_pept.errors import UserError

METADATA_FILE = ".metadata"

# The classes DCP pickles into .metadata (torch 2.6 - 2.13), and torch's own tensor-metadata types.
_CLASSES: dict[tuple[str, str], Any] = {
    (cls.__module__, cls.__qualname__): cls
    for cls in (
        dcp_metadata.Metadata,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,  # refused after loading, with a clear message
        dcp_metadata.TensorProperties,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata._MEM_FORMAT_ENCODING,
        _StorageInfo,
        torch.Size,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    )
}
# Instances whose state a pickle may set (BUILD); never a class, so nothing global can be rewritten.
_BUILDABLE = tuple(cls for cls in _CLASSES.values() if cls.__module__.startswith("torch.distributed"))
_FUNCTIONS: dict[tuple[str, str], Any] = {("torch.serialization", "_get_layout"): torch.serialization._get_layout}


class _RefusedPickle(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be checked one by one
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _CLASSES:
            return _CLASSES[key]
        if key in _FUNCTIONS:
            return _FUNCTIONS[key]
        value = vars(torch).get(name) if module == "torch" else None
        if isinstance(value, torch.dtype | torch.layout):
            return value
        raise _RefusedPickle(f"it refers to {module}.{name}, which DCP metadata never holds")

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedPickle("it holds a persistent reference, which DCP metadata never holds")

    def _load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type) or not isinstance(target, _BUILDABLE):
            raise _RefusedPickle(f"it sets the state of a {type(target).__name__}, which DCP metadata never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def _refuse(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} {why}; the checkpoint is damaged or was not written by this project: resume from another one "
        "(checkpoint.resume=PATH) or remove it"
    )


def _check_file_name(name: Any, *, state_dir: Path, source: Path) -> None:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise _refuse(source, f"names the data file {name!r}, which is not a plain file name in its folder")
    target = state_dir / name
    if target.is_symlink() or not target.is_file():
        raise _refuse(source, f"names the data file {name}, which is not a file in {state_dir}")


def _check(metadata: Any, *, state_dir: Path, source: Path) -> Metadata:
    if not isinstance(metadata, Metadata):
        raise _refuse(source, f"holds a {type(metadata).__name__}, not DCP metadata")
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise _refuse(source, "has no table of entries")
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise _refuse(source, f"has an entry named {key!r}, not a string")
        if not isinstance(entry, TensorStorageMetadata):
            raise _refuse(
                source,
                f"declares {key} as a {type(entry).__name__} (this project saves tensors only, and DCP would "
                "unpickle anything else with code execution)",
            )
        if not isinstance(entry.size, torch.Size) or not isinstance(entry.properties.dtype, torch.dtype):
            raise _refuse(source, f"declares a malformed size or dtype for {key}")
        for chunk in entry.chunks:
            if not isinstance(chunk, dcp_metadata.ChunkStorageMetadata):
                raise _refuse(source, f"declares a malformed chunk for {key}")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise _refuse(source, "has no table of data files")
    for index, info in storage.items():
        if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, _StorageInfo):
            raise _refuse(source, "has a malformed table of data files")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise _refuse(source, f"declares a malformed offset or length for {index.fqn}")
        if info.transform_descriptors and not all(isinstance(d, str) for d in info.transform_descriptors):
            raise _refuse(source, f"declares malformed transforms for {index.fqn}")
        _check_file_name(info.relative_path, state_dir=state_dir, source=source)
    return metadata


def read_metadata(state_dir: str | Path) -> Metadata:
    """The checked metadata of the DCP folder ``state_dir`` (see the module docstring); one UserError otherwise."""
    state_dir = Path(state_dir)
    source = state_dir / METADATA_FILE
    try:
        raw = source.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {source} ({err.strerror or err}); is this a complete checkpoint?") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except _RefusedPickle as err:
        raise UserError(
            f"{source} was refused: {err} (a checkpoint's metadata that could run code when read); do not resume "
            "from or export this checkpoint, and find out who wrote it"
        ) from None
    except Exception as err:  # truncated or garbled: EOFError, UnpicklingError, ValueError, KeyError ...
        raise _refuse(source, f"cannot be read ({type(err).__name__}: {err})") from None
    return _check(metadata, state_dir=state_dir, source=source)


class _CheckedReader(FileSystemReader):
    """A FileSystemReader that hands DCP metadata read and checked by :func:`read_metadata`."""

    def __init__(self, state_dir: Path, metadata: Metadata) -> None:
        super().__init__(str(state_dir))
        self._checked = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = copy.deepcopy(self._checked)
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise UserError(f"checkpoint entry {read_item.dest_index.fqn} is not a tensor; refusing to unpickle it")


def _damage(err: BaseException) -> str:
    if isinstance(err, CheckpointException):
        for failure in err.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, BaseException):
                return _damage(exc)
    if isinstance(err, UserError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load(state_dict: dict[str, Any], state_dir: str | Path, *, metadata: Metadata | None = None) -> None:
    """``dcp.load(state_dict)`` from ``state_dir`` through checked metadata (``metadata``: already read by
    :func:`read_metadata`); a damaged data file is one UserError naming the folder."""
    state_dir = Path(state_dir)
    metadata = read_metadata(state_dir) if metadata is None else metadata
    missing = [key for key in state_dict if key not in metadata.state_dict_metadata]
    if missing:
        raise UserError(f"{state_dir} does not hold {missing[0]}; the checkpoint is damaged or of another run")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state_dict, storage_reader=_CheckedReader(state_dir, metadata), planner=_TensorsOnlyPlanner())
    except (CheckpointException, RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise UserError(
            f"{state_dir} cannot be read ({_damage(err)}); the checkpoint is damaged: resume from an earlier one "
            "(checkpoint.resume=PATH) or remove it"
        ) from None
