"""File names read from files (an index, a completion marker, a weight map, a study spec) stay inside their folder.

A name such as ``../../x``, ``/etc/passwd`` or a path through a symbolic link that leads out of the folder would
make a reader read, or a writer write, outside the folder the user named. :func:`inside` is the one check every
such name goes through. Standard library only: every part of the stack may use it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from megatron_pept.errors import UserError


def inside(folder: str | os.PathLike[str], name: object, *, source: str, what: str = "file") -> Path:
    """``folder / name`` if ``name`` is a relative path that stays inside ``folder`` (no ``..`` component, not
    absolute, and no symbolic link on the way that leads out of it); otherwise one :class:`UserError` naming
    ``source`` (the file the name was read from) and the name. The target need not exist."""
    folder = Path(folder)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{source} names the {what} {name!r}, which is not a file name; the file is damaged")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts or not parts:
        raise UserError(
            f"{source} names the {what} {name!r}, which lies outside {folder} (an absolute path or '..'); only "
            "names inside the folder are read: the file is damaged or crafted"
        )
    target = folder / name
    root = folder.resolve()
    resolved = target.resolve()  # follows every symbolic link on the way (the target itself may not exist)
    if resolved != root and root not in resolved.parents:
        raise UserError(
            f"{source} names the {what} {name!r}, which leads out of {folder} through a symbolic link (to "
            f"{resolved}); only files inside the folder are read: replace the link with the file"
        )
    return target
