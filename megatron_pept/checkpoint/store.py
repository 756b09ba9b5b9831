"""Where checkpoints live and how they commit: atomic folders, completion markers with checksums, ``latest``,
retention, and finding the newest complete checkpoint.

Layout of ``checkpoint.dir`` (default ``run_dir/checkpoints``)::

    step_00000100/            a complete checkpoint (renamed into place only once everything is written)
        state/                DCP shards of model, optimizer and train state (one file per writing rank)
        rng/rank00000.pt      each rank's RNG states (tensors; loaded with weights_only=True)
        meta.json             step, tokens, method, phase, backend, world size, file sizes
        COMPLETE.json         sha256 and size of every file above; written last, before the rename
    latest                    the name of the newest complete checkpoint (replaced atomically)
    .tmp-step_00000200.RUNID/ a checkpoint being written by run RUNID (ignored; removed by the next run)
    .megatron_pept.lock       held by the run that owns the folder (see :mod:`.lock`)

A folder without ``COMPLETE.json`` or whose files do not match it is incomplete or corrupted and never resumed
from; ``checkpoint.resume=auto`` then falls back to the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_pept.errors import UserError
from megatron_pept.faults import fault_point
from megatron_pept.safe_paths import existing, inside

logger = logging.getLogger("megatron_pept")

MARKER = "COMPLETE.json"
META = "meta.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_name(step: int, *, run_id: str) -> str:
    """The folder a run writes step ``step`` into before committing it; named after the run, so no run ever
    deletes or writes into another's."""
    return f".tmp-{step_dir_name(step)}.{run_id}"


_TMP_DIR = re.compile(r"^\.(tmp|old)-(step_\d{8,})(?:\.(\w+))?$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checksum_files(folder: Path, *, rank: int = 0, world_size: int = 1) -> dict[str, dict]:
    """sha256 and size of this rank's share of the folder's files (every ``world_size``-th, from ``rank``), so
    the ranks of a job hash a large checkpoint in parallel."""
    mine = _files(folder)[rank::world_size]
    return {str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in mine}


def write_marker(folder: Path, files: dict[str, dict] | None = None) -> None:
    """Write the completion marker (last) with every file's checksum (computed here unless given)."""
    files = checksum_files(folder) if files is None else files
    missing = {str(p.relative_to(folder)) for p in _files(folder)} - set(files)
    if missing:
        raise RuntimeError(f"no checksum for {sorted(missing)[0]} in {folder}")
    write_json_atomic(folder / MARKER, {"files": dict(sorted(files.items()))})
    _fsync_dir(folder)


def verify(folder: Path, *, checksums: bool = True) -> str | None:
    """None when ``folder`` is a complete, intact checkpoint; otherwise why not (one line).

    The marker must list every file of the folder, each with its size and sha256, and nothing else; a marker that
    cannot be read that way means the checkpoint is not complete (never an exception)."""
    marker = folder / MARKER
    if not marker.is_file():
        from megatron_pept.models.hf_import import is_hf_model_folder

        if is_hf_model_folder(folder):
            return (
                f"{folder} is a Hugging Face model folder, not a checkpoint; to start from its weights use "
                f"model.init_from={folder} (and checkpoint.resume=auto or none)"
            )
        return f"{folder} is not a complete checkpoint (no {MARKER}; it was interrupted while being written)"
    try:
        files = json.loads(marker.read_text())["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise TypeError("'files' must map each file to its bytes and sha256")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{folder}/{MARKER} is malformed ({type(err).__name__}: {err})"
    links = [p for p in folder.rglob("*") if p.is_symlink()]
    if links:
        return f"{links[0]} is a symbolic link; a checkpoint holds plain files only (a tampered checkpoint?)"
    for name in files:
        try:
            inside(folder, name, source=f"{folder}/{MARKER}")
        except UserError as err:
            return str(err)
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    unlisted = sorted(present - set(files))
    if unlisted:
        return f"{folder}/{MARKER} does not list {unlisted[0]} (an incomplete or tampered marker)"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{folder} is missing {name}"
        if path.stat().st_size != expected["bytes"]:
            return f"{folder}/{name} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if checksums and _sha256(path) != expected["sha256"]:
            return f"{folder}/{name} does not match its sha256 (corrupted)"
    if not files:
        return f"{folder}/{MARKER} lists no files"
    return None


@dataclass(frozen=True)
class Found:
    path: Path
    step: int


def list_checkpoints(root: Path) -> list[Found]:
    """Committed checkpoint folders (complete or not), newest first."""
    if not root.is_dir():
        return []
    found = [Found(p, int(m.group(1))) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, key=lambda f: f.step, reverse=True)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder named ``step_NNNNNNNN`` (0 for a folder named otherwise)."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else 0


def newest_complete(
    root: Path, *, checksums: bool = True, accept: Callable[[Found], bool] | None = None
) -> Found | None:
    """The newest checkpoint that verifies (among those ``accept`` takes); damaged ones are reported and skipped."""
    for found in list_checkpoints(root):
        if accept is not None and not accept(found):
            continue
        problem = verify(found.path, checksums=checksums)
        if problem is None:
            return found
        logger.warning("skipping checkpoint: %s", problem)
    return None


def commit(root: Path, tmp: Path, step: int, *, files: dict[str, dict] | None = None, run_id: str = "local") -> Path:
    """Mark ``tmp`` complete (``files``: checksums computed by the ranks), rename it to its final name and point
    ``latest`` at it."""
    write_marker(tmp, files)
    fault_point("save.marked", step=step, rank=0)  # only rank 0 commits
    final = root / step_dir_name(step)
    if final.exists():  # the same step saved again (resumed from an older one): replace it now that tmp is complete
        stale = root / f".old-{final.name}.{run_id}"  # put back by clean_temporary if we die before the next line
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("save.renamed", step=step, rank=0)
    tmp_latest = root / f".{LATEST}.tmp"
    tmp_latest.write_text(final.name + "\n")
    os.replace(tmp_latest, root / LATEST)
    _fsync_dir(root)
    fault_point("save.committed", step=step, rank=0)
    return final


def read_latest(root: Path) -> str | None:
    """The checkpoint ``latest`` names, if any."""
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def prune(root: Path, *, keep_last: int, keep_every: int, accept: Callable[[Found], bool] | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, keeping every ``keep_every``-th step; only
    among those ``accept`` takes (a run's own, in a folder shared with another run).

    Only runs after a newer checkpoint committed; incomplete folders older than the newest complete one go too."""
    found = [f for f in list_checkpoints(root) if accept is None or accept(f)]
    complete = [f for f in found if (f.path / MARKER).is_file()]
    if not complete:
        return []
    newest = complete[0].step
    keep = {f.path for f in complete[: max(1, keep_last)]}
    removed = []
    for f in found:
        if f.path in keep or (keep_every > 0 and f.step % keep_every == 0 and (f.path / MARKER).is_file()):
            continue
        if f.step >= newest:
            continue
        shutil.rmtree(f.path, ignore_errors=True)
        removed.append(f.path)
    return removed


def clean_temporary(root: Path, *, keep_run_id: str) -> None:
    """Remove what saves of other runs left behind: their temporary folders (a crash during a save), and put back
    a checkpoint a crash left renamed aside while being replaced. Call it only while holding the folder's lock
    (:mod:`.lock`): then no other run is alive to own them."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _TMP_DIR.match(p.name)
        if not p.is_dir() or m is None or m.group(3) == keep_run_id:
            continue
        final = root / m.group(2)
        if m.group(1) == "old" and not final.exists():
            os.replace(p, final)  # its replacement never arrived: the previous checkpoint is still the right one
            logger.warning("restored %s, left aside by a save interrupted while replacing it", final)
            continue
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path, *, checksums: bool = True) -> Path:
    """A checkpoint folder, or the newest complete one in a run's checkpoints folder / run_dir; verified."""
    path = existing(path)
    for candidate in (path, path / "checkpoints"):
        if not (candidate / MARKER).exists() and list_checkpoints(candidate):
            found = newest_complete(candidate, checksums=checksums)
            if found is None:
                raise UserError(f"no complete checkpoint in {candidate}")
            return found.path
    from megatron_pept.models.hf_import import is_hf_model_folder

    looks_like_one = _STEP_DIR.match(path.name) or any((path / n).exists() for n in (META, MARKER, "state", "rng"))
    if path.is_dir() and not looks_like_one and not is_hf_model_folder(path):
        raise UserError(
            f"{path} holds no checkpoint (none was saved there, or they were deleted); name a checkpoint folder, or "
            "a run_dir or checkpoints folder that holds one"
        )
    problem = verify(path, checksums=checksums)
    if problem:
        raise UserError(problem)
    return path
