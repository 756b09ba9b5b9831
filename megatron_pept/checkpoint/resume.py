"""What a resume may continue, and whose checkpoints a run may touch.

**Compatibility.** A checkpoint's optimizer and method state only mean something under the method and the
settings that made them: GaLore's projector and moments have the saved rank, error feedback keeps a residual
that plain GaLore has not, Adam-mini keeps other moments than AdamW. A resume that changes ``method.name`` (other
than to a method that declares it continues that one exactly: :attr:`Method.resumes_from`), one of the method's
:attr:`Method.resume_keys`, ``optim.state_dtype``, ``train.param_dtype`` or (with bf16 weights) the rule
``optim.weight_update`` resolves to is refused in one line naming what differs, before anything
is loaded or written. To carry a checkpoint's weights into another method, export them
(``megatron-pept-convert-to-hf``) and start a new run from them (``model.init_from=HF_FOLDER``).

**Ownership.** Every run folder has a run id (``run_dir/run.json``, written when the run is first accepted), and
every checkpoint records the id and the ``run_dir`` of the run that wrote it (``meta.json``'s ``run``). A run
resumes on its own (``checkpoint.resume=auto``) only from its own checkpoints; a checkpoint of another run folder
is resumed only when named (``checkpoint.resume=PATH``, which the log says); retention prunes only the run's own
checkpoints; and a run whose saves would replace another run's checkpoint (two run_dirs sharing one
``checkpoint.dir``) is refused before its first step. Checkpoints of earlier versions, which record no run, count
as the run's own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_pept.checkpoint import store
from megatron_pept.distributed import comm
from megatron_pept.errors import UserError

logger = logging.getLogger("megatron_pept")

RUN_FILE = "run.json"
OPTIM_RESUME_KEYS = ("state_dtype",)  # the dtype the moments are kept in


@dataclass(frozen=True)
class RunIdentity:
    """Which run folder a run is: its id (None until its first acceptance writes ``run.json``) and its path."""

    run_id: str | None
    run_dir: str

    def owns(self, owner: dict[str, Any] | None) -> bool:
        """Whether a checkpoint that records ``owner`` (``meta.json``'s ``run``; None: an earlier version's) is this
        run's: the same id, or, for a run folder whose ``run.json`` is gone, the same run_dir."""
        if owner is None:
            return True
        if self.run_id is not None:
            return owner.get("id") == self.run_id
        return owner.get("run_dir") == self.run_dir

    def as_meta(self) -> dict[str, str | None]:
        return {"id": self.run_id, "run_dir": self.run_dir}


def read_identity(run_dir: str | Path) -> RunIdentity:
    """The identity of ``run_dir`` (its id from ``run.json``, if it has one); one line if that file is damaged."""
    run_dir = Path(run_dir).absolute()
    path = run_dir / RUN_FILE
    run_id = None
    if path.is_file():
        try:
            run_id = json.loads(path.read_text())["run_id"]
            if not isinstance(run_id, str) or not run_id:
                raise TypeError("run_id is not a string")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"{path} is damaged ({type(err).__name__}: {err}); restore it, or delete it to adopt this run "
                "folder's checkpoints again"
            ) from None
    return RunIdentity(run_id, str(run_dir))


def shared_identity(run_dir: str | Path) -> RunIdentity:
    """:func:`read_identity` on rank 0, shared with every rank (a damaged ``run.json`` is an error on all)."""
    identity, error = None, None
    if comm.rank() == 0:
        try:
            identity = read_identity(run_dir)
        except UserError as err:
            error = str(err)
    error = comm.broadcast_object(error)
    if error:
        raise UserError(error)
    return comm.broadcast_object(identity)


def adopt_identity(identity: RunIdentity, checkpoint: Path | None) -> RunIdentity:
    """The identity an accepted run keeps: its own; for a run folder without ``run.json`` the id of the checkpoint
    it resumes, when that checkpoint is its own (its ``run.json`` was lost); else a new id."""
    if identity.run_id is not None:
        return identity
    owner = checkpoint_owner(checkpoint) if checkpoint is not None else None
    if owner is not None and owner.get("run_dir") == identity.run_dir and isinstance(owner.get("id"), str):
        return RunIdentity(owner["id"], identity.run_dir)
    return RunIdentity(uuid.uuid4().hex, identity.run_dir)


def write_identity(identity: RunIdentity) -> None:
    """Write ``run_dir/run.json`` if the run folder has none (called once the run is accepted)."""
    path = Path(identity.run_dir) / RUN_FILE
    if path.exists():
        return
    tmp = path.with_name(f".{RUN_FILE}.tmp")
    tmp.write_text(json.dumps({"run_id": identity.run_id}) + "\n")
    os.replace(tmp, path)


def checkpoint_owner(folder: Path) -> dict[str, Any] | None:
    """``meta.json``'s ``run`` entry of a checkpoint folder (None when it records none or cannot be read)."""
    try:
        owner = json.loads((folder / store.META).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, dict) else None


def others_checkpoints(root: Path, identity: RunIdentity) -> list[tuple[store.Found, dict[str, Any]]]:
    """The checkpoint folders of ``root`` written by other runs, newest first, with the run each records."""
    out = []
    for found in store.list_checkpoints(root):
        owner = checkpoint_owner(found.path)
        if not identity.owns(owner):
            out.append((found, owner or {}))
    return out


def check_no_overwrite(root: Path, identity: RunIdentity, *, start_step: int) -> None:
    """Refuse a run whose later saves would replace another run's checkpoint in ``root`` (a shared folder)."""
    later = [(f, owner) for f, owner in others_checkpoints(root, identity) if f.step > start_step]
    if later:
        found, owner = later[0]
        raise UserError(
            f"{root} holds {found.path.name}, a checkpoint of another run (run_dir {owner.get('run_dir', '?')}), "
            f"which this run (from step {start_step}) would replace when it saves: give this run a checkpoint.dir "
            "of its own, or move that run's checkpoints away"
        )


def _differences(saved: dict[str, Any], cfg: Any, method: Any) -> list[str]:
    saved_method = saved.get("method", {})
    saved_name = saved_method.get("name")
    if saved_name is not None and saved_name != method.name and saved_name not in method.resumes_from:
        return [f"method.name={saved_name} (this run: method.name={method.name})"]
    out = []
    settings = _plain(method.cfg)  # the method's settings, as the run uses them
    for key in method.resume_keys:
        asked = settings[key]
        if key in saved_method and saved_method[key] != asked:
            out.append(f"method.{key}={saved_method[key]!r} (this run: {asked!r})")
    saved_optim = saved.get("optim", {})
    for key in OPTIM_RESUME_KEYS:
        asked = _plain(cfg.optim)[key]
        if key in saved_optim and saved_optim[key] != asked:
            out.append(f"optim.{key}={saved_optim[key]!r} (this run: {asked!r})")
    # The weights' dtype and, for bf16 weights, the rule that rounds into them (its state: a count, or a buffer);
    # a checkpoint of an earlier version holds fp32 weights.
    saved_weights = saved.get("train", {}).get("param_dtype", "fp32")
    if saved_weights != cfg.train.param_dtype:
        out.append(f"train.param_dtype={saved_weights!r} (this run: {cfg.train.param_dtype!r})")
    elif saved_weights == "bf16":
        saved_rule, asked_rule = _rounding(saved_optim.get("weight_update")), _rounding(cfg.optim.weight_update)
        if saved_rule != asked_rule:
            out.append(f"optim.weight_update={saved_rule!r} (this run: {asked_rule!r})")
    return out


def _rounding(rule: str | None) -> str:
    """What ``optim.weight_update`` resolves to with bf16 weights (``auto``: stochastic)."""
    return "stochastic" if rule in (None, "auto") else rule


def _plain(section: Any) -> dict[str, Any]:
    """A config section (a dataclass) as meta.json's config holds it (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}


def check_compatible(path: Path, meta: dict[str, Any], cfg: Any, method: Any) -> None:
    """Refuse to resume ``path`` (its ``meta.json`` read as ``meta``) under settings its state cannot continue
    under (see the module docstring); checkpoints that record no config (earlier versions) are not checked."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return
    differences = _differences(saved, cfg, method)
    if not differences:
        return
    what = differences[0] if len(differences) == 1 else f"{differences[0]} and {len(differences) - 1} more"
    raise UserError(
        f"{path} was saved with {what}, and its optimizer and method state cannot continue under this run's "
        f"setting: resume with the saved value, or start a new run from its weights (megatron-pept-convert-to-hf, "
        "then model.init_from=HF_FOLDER)"
    )


def describe_owner(path: Path, identity: RunIdentity) -> str | None:
    """A line for the log when ``path`` is another run's checkpoint (None when it is this run's own)."""
    owner = checkpoint_owner(path)
    if identity.owns(owner):
        return None
    return f"resuming from {path}, a checkpoint of another run (run_dir {owner.get('run_dir', '?')}), as named"
