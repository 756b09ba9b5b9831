"""Saving and resuming a run: the one place that knows what a checkpoint holds (see :mod:`.state`) and how it
commits (see :mod:`.store`).

Every rank writes its own shards with DCP (single process, DDP, FSDP2); rank 0 then checksums the folder,
writes the completion marker, renames it into place, moves ``latest`` and prunes old checkpoints. Each rank's
RNG states go in a small tensor file of their own. Under DeepSpeed the engine's own checkpoint format holds the
model and optimizer (ZeRO partitions); our train, method and loader state go beside it in DCP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import resource
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_pept.checkpoint import safe_dcp, store
from megatron_pept.checkpoint import state as cs
from megatron_pept.checkpoint.lock import FolderLock
from megatron_pept.checkpoint.resume import (
    RunIdentity,
    adopt_identity,
    check_no_overwrite,
    checkpoint_owner,
    describe_owner,
    others_checkpoints,
    shared_identity,
    write_identity,
)
from megatron_pept.config import CheckpointConfig, Config, to_dict
from megatron_pept.distributed import Backend, comm
from megatron_pept.errors import UserError
from megatron_pept.faults import fault_point
from megatron_pept.sharding import optimizer_protocol

logger = logging.getLogger("megatron_pept")


warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")


def _io_reason(err: BaseException, root: Path) -> str:
    """One line for a failed write: the OS's reason (and file), also from inside DCP's wrapped exceptions; for an
    error that names no reason (torch.save's writer says "unexpected pos"), a full disk if the disk is full."""
    if isinstance(err, CheckpointException):
        for failure in err.failures.values():  # per rank: (exception, traceback)
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, BaseException):
                return _io_reason(exc, root)
        return "checkpoint write failed"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    with contextlib.suppress(OSError):
        if shutil.disk_usage(root).free < (1 << 20):
            return f"{os.strerror(errno.ENOSPC)} ({str(err).strip().splitlines()[0]})"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is, or wraps (DCP's CheckpointException), a KeyboardInterrupt."""
    if isinstance(err, CheckpointException):
        return any(
            isinstance(failure[0] if isinstance(failure, tuple) else failure, KeyboardInterrupt)
            for failure in err.failures.values()
        )
    return False


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer with a fault point inside DCP's own write, where an exception (Ctrl-C) reaches us wrapped
    in a CheckpointException."""

    def __init__(self, path: Path, *, step: int) -> None:
        super().__init__(str(path))
        self._step = step

    def write_data(self, plan: Any, planner: Any) -> Any:
        fault_point("save.state", step=self._step, rank=comm.rank())
        return super().write_data(plan, planner)


def run_meta(cfg: Config, *, model_args: Any, method: Any, backend: str, index: Any) -> dict[str, Any]:
    """What a checkpoint's ``meta.json`` says about its run (read by export, inspection and resume checks)."""
    method_state = method.state_dict()
    return {
        "method": method.name,
        "phase": int(method_state["phase"]) if "phase" in method_state else None,
        "backend": backend,
        "model": cfg.model.name,
        "total_steps": cfg.train.steps,
        "model_args": dataclasses.asdict(model_args),
        "config": to_dict(cfg),
        "tokenizer": {"eos_id": index.eos_id, "bos_id": index.bos_id, "sha256": index.tokenizer_sha256},
    }


def checkpoint_root(cfg: CheckpointConfig, *, run_dir: str | Path) -> Path:
    """The folder that holds a run's checkpoints: ``checkpoint.dir``, by default ``run_dir/checkpoints``."""
    return Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"


def lock_run_folders(folders: list[Path], *, rank: int) -> tuple[FolderLock, str]:
    """Lock a run's folders for this job (rank 0 holds the locks; every rank gets the outcome) and name the run:
    ``(lock, run_id)``. Each folder is locked itself (a checkpoint folder inside run_dir too: another run may name
    it as its checkpoint.dir). Another job holding one is a :class:`UserError` on every rank."""
    run_id = uuid.uuid4().hex[:12] if rank == 0 else None
    lock = FolderLock(folders if rank == 0 else [], run_id=run_id or "")
    error = None
    if rank == 0:
        try:
            lock.acquire()
        except UserError as err:
            error = str(err)
    error = comm.broadcast_object(error)
    if error:
        raise UserError(error)
    return lock, comm.broadcast_object(run_id)


class Checkpointer:
    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        run_id: str = "local",
        identity: RunIdentity | None = None,
    ) -> None:
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir=run_dir)
        self.rank, self.world_size = rank, world_size
        self.run_id = run_id  # names this process's temporary folders
        # Which run folder this is: its checkpoints record it, and it decides which ones it resumes and prunes.
        self.identity = identity if identity is not None else shared_identity(run_dir)
        self._pending: tuple[Future, Path, int] | None = None
        # The background save's own process group (None in one process).
        self._async_group = comm.new_gloo_group() if cfg.async_save else None

    # -- before the first step ---------------------------------------------------------------------------------

    def preflight(self, *, run_dir: Path, checkpoint_bytes: int) -> None:
        """Prove, before any step, that the run can save: its folders take a write, the checkpoint folder has room
        for one more checkpoint of ``checkpoint_bytes`` (the old ones are pruned only after it commits), and the
        process may write files that large (``ulimit -f``). One line on every rank otherwise."""
        error = None
        try:
            if self.rank == 0:
                for folder in dict.fromkeys((Path(run_dir), self.root)):
                    probe = folder / f".megatron_pept.probe.{self.run_id}"
                    with open(probe, "wb") as f:
                        f.write(b"\0" * 4096)
                        f.flush()
                        os.fsync(f.fileno())
                    probe.unlink()
                if self.cfg.interval > 0 or self.cfg.save_on_signal:
                    free = shutil.disk_usage(self.root).free
                    if free < checkpoint_bytes:
                        raise UserError(
                            f"{self.root} has {free / 1e9:.3g} GB free but a checkpoint of this run takes about "
                            f"{checkpoint_bytes / 1e9:.3g} GB: free space or point checkpoint.dir elsewhere"
                        )
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            per_rank = checkpoint_bytes // max(1, self.world_size)
            if limit != resource.RLIM_INFINITY and limit < per_rank:
                raise UserError(
                    f"this process may write files of at most {limit / 1e6:.3g} MB (ulimit -f) but its share of a "
                    f"checkpoint is about {per_rank / 1e6:.3g} MB: raise the limit"
                )
        except OSError as err:
            error = (
                f"cannot write in {err.filename or self.root} ({err.strerror}); choose a writable run_dir / "
                "checkpoint.dir"
            )
        except UserError as err:
            error = str(err)
        error = comm.first_error(error)
        if error:
            raise UserError(error)

    # -- finding the checkpoint to resume ---------------------------------------------------------------------

    def resolve_resume(self) -> Path | None:
        """The checkpoint folder to resume from, decided on rank 0 and shared; None to start fresh."""
        choice = None
        error = None
        if self.rank == 0:
            try:
                choice = self._resolve_on_rank0()
            except UserError as err:
                error = str(err)
        error = comm.broadcast_object(error)
        if error:
            raise UserError(error)
        choice = comm.broadcast_object(str(choice) if choice else None)
        return Path(choice) if choice else None

    def _resolve_on_rank0(self) -> Path | None:
        resume = self.cfg.resume
        checks = self.cfg.verify_checksums
        if resume == "none" and store.list_checkpoints(self.root):
            raise UserError(
                f"checkpoint.resume=none but {self.root} already holds checkpoints; resume with "
                "checkpoint.resume=auto, or use another run_dir / checkpoint.dir"
            )
        store.clean_temporary(self.root, keep_run_id=self.run_id)  # others' are abandoned: we hold the lock
        if resume == "none":
            return None
        if resume == "auto":
            found = self.newest_own(checksums=checks)
            if found is None:
                others = others_checkpoints(self.root, self.identity)
                if others:
                    owner = others[0][1]
                    raise UserError(
                        f"{self.root} holds checkpoints of another run (run_dir {owner.get('run_dir', '?')}) and "
                        "none of this one: to continue from one of them name it (checkpoint.resume=PATH), or give "
                        "this run a checkpoint.dir of its own"
                    )
            path = found.path if found else None
        else:
            try:
                path = store.resolve_checkpoint(resume, checksums=checks)
            except UserError as err:
                raise UserError(f"checkpoint.resume={resume}: {err}") from None
            note = describe_owner(path, self.identity)
            if note:
                logger.warning(note)
        check_no_overwrite(self.root, self.identity, start_step=store.checkpoint_step(path) if path else 0)
        return path

    def newest_own(self, *, checksums: bool = True) -> store.Found | None:
        """This run's newest complete checkpoint (other runs' in a shared checkpoint.dir are not its own)."""
        return store.newest_complete(
            self.root, checksums=checksums, accept=lambda f: self.identity.owns(checkpoint_owner(f.path))
        )

    def accept(self, *, resumed_from: Path | None) -> None:
        """The run is accepted: keep its id (or adopt that of its own checkpoint, or make one) and write it into
        ``run_dir/run.json`` if the folder has none yet."""
        identity = adopt_identity(self.identity, resumed_from) if self.rank == 0 else None
        self.identity = comm.broadcast_object(identity)
        if self.rank == 0:
            write_identity(self.identity)

    # -- saving -----------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: Any,
        parts: dict[str, Any],
        meta: dict[str, Any],
        backend: Backend,
        files: dict[str, Path] | None = None,
    ) -> None:
        """Write the checkpoint of ``step`` (every rank calls this). Synchronous unless checkpoint.async_save.
        ``files``: extra files copied in by rank 0 (the tokenizer), under their given relative names.

        A failed write (full disk, I/O error) on any rank stops every rank with the same one-line error; the
        partial folder is removed and the previous checkpoint stays complete and ``latest``."""
        self.finish_pending()
        tmp = self.root / store.tmp_dir_name(step, run_id=self.run_id)

        def begin() -> None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)

        self._stage(step, tmp, begin)
        full_meta = {
            **meta,
            "run": self.identity.as_meta(),
            "step": step,
            "world_size": self.world_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "format": "megatron_pept-checkpoint-1",
        }

        def write_small_files() -> None:
            torch.save(cs.rng_state(), tmp / "rng" / f"rank{self.rank:05d}.pt")
            if self.rank == 0:
                (tmp / store.META).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
                for name, source in (files or {}).items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, tmp / name)

        self._stage(step, tmp, write_small_files)
        # A backend with a format of its own (DeepSpeed: the ZeRO-partitioned model and optimizer) writes it first.
        native = self._stage(step, tmp, lambda: backend.save_native(tmp))
        state = cs.checkpoint_state(model, optimizer, parts, native=native)
        if self.cfg.async_save:
            future = self._stage(
                step,
                tmp,
                lambda: dcp.async_save(state, checkpoint_id=str(tmp / "state"), process_group=self._async_group),
            )
            self._pending = (future, tmp, step)
            fault_point("save.async", step=step, rank=self.rank)
            return
        self._stage(step, tmp, lambda: dcp.save(state, storage_writer=_Writer(tmp / "state", step=step)))
        self._commit(tmp, step)

    def finish_pending(self) -> None:
        """Wait for a background save and commit it (every rank calls this)."""
        if self._pending is None:
            return
        future, tmp, step = self._pending
        self._pending = None
        self._stage(step, tmp, future.result)
        self._commit(tmp, step)

    def _commit(self, tmp: Path, step: int) -> None:
        def checksum() -> dict:
            fault_point("save.written", step=step, rank=self.rank)
            return store.checksum_files(tmp, rank=self.rank, world_size=self.world_size)  # hashed in parallel

        comm.barrier()  # every rank's shards are on disk
        files = self._stage(step, tmp, checksum)
        files = {name: value for share in comm.all_gather_object(files) for name, value in share.items()}

        def commit() -> None:
            if self.rank == 0:
                final = store.commit(self.root, tmp, step, files=files, run_id=self.run_id)
                removed = store.prune(
                    self.root,
                    keep_last=self.cfg.keep_last,
                    keep_every=self.cfg.keep_every,
                    accept=lambda f: self.identity.owns(checkpoint_owner(f.path)),  # never another run's
                )
                logger.info("checkpoint saved: %s%s", final, f" (pruned {len(removed)} older)" if removed else "")

        self._stage(step, tmp, commit)
        comm.barrier()

    def _stage(self, step: int, tmp: Path, fn: Callable[[], Any]) -> Any:
        """Run one stage of a save on this rank; if it failed on any rank, every rank stops with the same error
        (so none waits in a collective for a rank that gave up)."""
        error, result = None, None
        try:
            result = fn()
        except (OSError, CheckpointException, RuntimeError) as err:  # torch.save reports a failed write as a
            if _interrupted(err):  # Ctrl-C inside DCP, which wraps it: an interruption, not a failed write
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise KeyboardInterrupt from None
            logger.error("saving step %d failed on rank %d", step, self.rank, exc_info=True)  # RuntimeError
            error = _io_reason(err, self.root)
        except KeyboardInterrupt:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        error = comm.first_error(error)
        if error:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = store.read_latest(self.root)
            raise UserError(
                f"saving the checkpoint of step {step} in {self.root} failed ({error}); "
                + (f"{latest} is intact and still the latest" if latest else "no earlier checkpoint exists")
                + ": free space or fix the folder, then resume (checkpoint.resume=auto)"
            )
        return result

    # -- loading ----------------------------------------------------------------------------------------------

    def load(
        self,
        path: Path,
        *,
        model: nn.Module,
        optimizer_fn: Callable[[], Any],
        parts: dict[str, Any],
        backend: Backend,
        after_extra: Callable[[], None] | None = None,
        added_keys: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """Put the state of checkpoint ``path`` back: first the train/method/loader state (so the method can put
        the model in its saved phase: ``after_extra``), then the model and the optimizer ``optimizer_fn()``
        returns at that point. ``added_keys`` (part -> state keys) names state newer than some checkpoints: a
        checkpoint without it still loads, and the part keeps its own values of those keys."""
        state_dir = path / "state"
        metadata = safe_dcp.read_metadata(state_dir)  # never plain pickle: see safe_dcp
        saved = metadata.state_dict_metadata
        extra = cs.extra_state(parts)
        optional = {cs.extra_key(part, key) for part, keys in (added_keys or {}).items() for key in keys}
        for key in [k for k in extra if k in optional and k not in saved]:
            del extra[key]
        missing = [k for k in extra if k not in saved]
        if missing:
            raise UserError(
                f"{path} does not hold {missing[0]} (saved by another method or version?); resume with the config "
                "it was saved with"
            )
        for key, value in extra.items():
            saved_size = tuple(saved[key].size)
            if saved_size != tuple(value.shape):  # e.g. another number of blended datasets
                extra[key] = torch.empty(saved_size, dtype=saved[key].properties.dtype)
        safe_dcp.load(extra, state_dir, metadata=metadata)
        cs.load_extra(parts, extra)
        if after_extra is not None:
            after_extra()
        rng_file = path / "rng" / f"rank{self.rank:05d}.pt"
        if rng_file.is_file():
            cs.set_rng_state(cs.read_rng_state(rng_file))
        if backend.load_native(path):  # the backend's own format held the model (and its optimizer's state)
            optimizer = optimizer_fn()
            if optimizer_protocol(optimizer).zero_layout is not None:
                optim_sd = cs.optimizer_destinations(model, optimizer, saved)
                if optim_sd:
                    safe_dcp.load(optim_sd, state_dir, metadata=metadata)
                    cs.install_optimizer_state(model, optimizer, optim_sd)
            logger.info("resumed from %s", path)
            return
        optimizer = optimizer_fn()
        model_sd = cs.model_state(model)
        unknown = [k for k in model_sd if k not in saved]
        if unknown:
            raise UserError(f"{path} has no {unknown[0]}: it was saved from another model or method")
        for key, value in model_sd.items():
            saved_shape = tuple(saved[key].size) if isinstance(saved[key], TensorStorageMetadata) else ()
            if saved_shape != tuple(value.shape):
                raise UserError(
                    f"{path} holds {key[len('model.') :]} of shape {list(saved_shape)} but this run builds "
                    f"{list(value.shape)}: resume with the model settings it was saved with, or use a new run_dir"
                )
        safe_dcp.load(model_sd, state_dir, metadata=metadata)
        model.load_state_dict({k[len("model.") :]: v for k, v in model_sd.items()})
        optim_sd = cs.optimizer_destinations(model, optimizer, saved)
        if optim_sd:
            safe_dcp.load(optim_sd, state_dir, metadata=metadata)
            cs.install_optimizer_state(model, optimizer, optim_sd)
        logger.info("resumed from %s", path)
