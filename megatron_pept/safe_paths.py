"""File names read from files (an index, a completion marker, a weight map, a state file) stay inside their folder.

A name such as ``../../x``, ``/etc/passwd`` or a path through a symbolic link that leads out of the folder would
make a reader read, or a writer write, outside the folder the user named. :func:`outside_reason` is the one check
every such name goes through. Standard library only: every part of the stack may use it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from megatron_pept.errors import UserError


def outside_reason(
    root: str | os.PathLike[str], name: object, *, link_root: str | os.PathLike[str] | None = None
) -> str | None:
    """Why the file ``name`` (read from a file of the folder ``root``) would not be a file inside ``root``, or None
    when it is: not a name, an absolute path, a ``..`` component, or a symbolic link (the file or a folder on the
    way) that resolves outside ``link_root`` (default ``root``; a Hugging Face cache snapshot links into its
    model's cache folder). The target need not exist."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        return "is not a file name"
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute():
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "goes up out of the folder (..)"
    if len(Path(name).parts) == 1 and not (Path(root) / name).is_symlink():
        return None  # a plain file of the folder (what this project writes): one lstat, not a walk of the path
    allowed = Path(link_root if link_root is not None else root).resolve()
    target = (Path(root) / name).resolve()  # follows every link on the way
    if target != allowed and allowed not in target.parents:
        return f"is a symlink that leads out of the folder (to {target})"
    return None


def inside(folder: str | os.PathLike[str], name: object, *, source: str, what: str = "file") -> Path:
    """``folder / name`` when :func:`outside_reason` finds nothing wrong; otherwise one :class:`UserError` naming
    ``source`` (the file the name was read from) and the name."""
    reason = outside_reason(folder, name)
    if reason is not None:
        raise UserError(
            f"{source} names the {what} {name!r}, which {reason}; only files inside {folder} are read: the file is "
            "damaged or crafted"
        )
    return Path(folder) / str(name)


def existing(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path; a :class:`UserError` saying it does not exist when it does not (a checkpoint a tool or
    an export was given)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    return path


def check_export_output(output: Path, *, overwrite: bool) -> bool:
    """Refuse an output a Hugging Face export must not write, before anything is read; True if an existing
    non-empty folder is to be replaced (``megatron_pept.checkpoint.hf_export``; here, with no torch to import, so
    that the convert tool answers a wrong --output at once)."""
    if output.is_symlink():  # replacing it would drop the link; writing through it would land elsewhere
        raise UserError(
            f"--output {output} is a symbolic link; give the path of a real folder (links are not followed)"
        )
    if not Path(os.path.abspath(output)).name:
        raise UserError(f"--output {output} names no folder; give the path of a new folder")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder; give the path of a new folder")
    try:
        filled = output.is_dir() and any(output.iterdir())
    except OSError as err:
        raise UserError(f"--output {output} cannot be read ({err.strerror or err}); give another folder") from None
    if filled and not overwrite:
        raise UserError(
            f"{output} exists and is not empty; choose a new folder, or give --overwrite to replace it (nothing is "
            "overwritten)"
        )
    return filled
