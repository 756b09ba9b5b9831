"""Checkpoints that run code when read with plain pickle (shared by the tests of issue 25's item 1)."""

from __future__ import annotations

import operator
import os
import pickle
from pathlib import Path

from megatron_pept.checkpoint import safe_dcp, store


class Command:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _RunThenReturn:
    """Unpickles as ``(os.system(command), value)[1]``: the command runs, then the real metadata comes back, so a
    reader that unpickles it goes on as if nothing happened."""

    def __init__(self, command: str, value: object) -> None:
        self.command, self.value = command, value

    def __reduce__(self):
        return operator.itemgetter(1), ((Command(self.command), self.value),)


def poison(checkpoint: Path, marker: Path) -> None:
    """Make the checkpoint's ``.metadata`` create ``marker`` when unpickled, then return the real metadata; the
    completion marker is recomputed to match, so the checkpoint verifies."""
    meta_file = checkpoint / "state" / safe_dcp.METADATA_FILE
    real = pickle.loads(meta_file.read_bytes())  # our own file, written by this test's run
    meta_file.write_bytes(pickle.dumps(_RunThenReturn(f"touch {marker}", real)))
    (checkpoint / store.MARKER).unlink()
    store.write_marker(checkpoint)
    assert store.verify(checkpoint) is None
