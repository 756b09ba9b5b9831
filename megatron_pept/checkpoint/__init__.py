"""Sharded, atomically committed checkpoints (DCP; DeepSpeed's own format under DeepSpeed) and exact resume."""

from megatron_pept.checkpoint.manager import Checkpointer, checkpoint_root, lock_run_folders, run_meta
from megatron_pept.checkpoint.store import list_checkpoints, newest_complete, verify

__all__ = [
    "Checkpointer",
    "checkpoint_root",
    "list_checkpoints",
    "lock_run_folders",
    "newest_complete",
    "run_meta",
    "verify",
]
