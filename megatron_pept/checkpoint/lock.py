"""One run per folder: an exclusive lock on ``run_dir`` (and on the checkpoint folder when it lies elsewhere).

Two jobs writing one run's checkpoints (a SLURM requeue while the old job still runs, the same command started
twice) would delete or mix each other's saves. So a run takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``FOLDER/.megatron_pept.lock`` before it writes anything, and holds it for its whole life:

* the lock belongs to the open file, so the kernel releases it when the process ends in any way (kill -9
  included): no stale lock to clean up by hand;
* rank 0 takes it for the whole job (one job, one holder); the other ranks learn the outcome from rank 0;
* another job finds it held and stops with one line naming the holder (host, pid, run id, SLURM job, start time,
  written into the file by the holder);
* the folders must be on one filesystem that every node sees, and that filesystem must support ``flock`` across
  nodes (local disks, NFSv4, Lustre mounted with ``-o flock``, GPFS do); where it does not, the run warns and goes
  on unlocked.

A run refused before it starts removes the lock files (and folders) it created, so it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from megatron_pept.errors import UserError

logger = logging.getLogger("megatron_pept")

LOCK_FILE = ".megatron_pept.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderLock:
    """Exclusive locks on ``folders`` for this process (see the module docstring)."""

    def __init__(self, folders: list[Path], *, run_id: str) -> None:
        self.folders = list(dict.fromkeys(Path(f).absolute() for f in folders))
        self.run_id = run_id
        self._held: list[tuple[Path, int]] = []  # (lock file, fd)
        self._created: list[Path] = []  # lock files and folders this lock made, newest last

    def acquire(self) -> None:
        """Lock every folder (creating it if needed) or raise :class:`UserError` naming the run that holds one."""
        try:
            for folder in self.folders:
                self._lock(folder)
        except BaseException:
            self.abandon()
            raise

    def _lock(self, folder: Path) -> None:
        missing = []
        for parent in (folder, *folder.parents):
            if parent.exists():
                break
            missing.append(parent)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create {folder} ({err.strerror}); choose a writable run_dir / checkpoint.dir"
            ) from None
        self._created.extend(reversed(missing))
        path = folder / LOCK_FILE
        existed = path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(
                f"cannot write in {folder} ({err.strerror}); choose a writable run_dir / checkpoint.dir"
            ) from None
        if not existed:
            self._created.append(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(path)
            os.close(fd)
            raise UserError(
                f"{folder} is in use by another run ({holder}); wait for it to end, stop it, or use another "
                "run_dir / checkpoint.dir"
            ) from None
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            logger.warning(
                "cannot lock %s (%s): this filesystem does not support flock, so a second job on this run_dir "
                "would not be detected",
                folder,
                err.strerror,
            )
            os.close(fd)
            return
        self._held.append((path, fd))
        info = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Let go of the locks (the files stay: removing them would race with a run about to take them)."""
        for _, fd in self._held:
            os.close(fd)
        self._held = []

    def abandon(self) -> None:
        """Release, and remove what acquiring created: a refused run leaves the folders as it found them."""
        created, self._created = self._created, []
        for path, fd in self._held:
            if path in created:
                path.unlink(missing_ok=True)  # while still held: nobody else can be inside
            os.close(fd)
        self._held = []
        for path in reversed(created):
            with contextlib.suppress(OSError):  # a folder that is not empty stays
                path.unlink() if path.name == LOCK_FILE else path.rmdir()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit os may be half torn down
            self.release()


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        parts = [f"pid {info['pid']} on {info['host']}", f"run {info['run_id']}", f"started {info['started']}"]
        if info.get("slurm_job_id"):
            parts.append(f"SLURM job {info['slurm_job_id']}")
        return ", ".join(parts)
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
