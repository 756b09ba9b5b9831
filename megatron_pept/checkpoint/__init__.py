"""Sharded, atomically committed checkpoints (DCP; DeepSpeed's own format under DeepSpeed) and exact resume."""

from megatron_pept.checkpoint.manager import Checkpointer
from megatron_pept.checkpoint.store import list_checkpoints, newest_complete, verify

__all__ = ["Checkpointer", "list_checkpoints", "newest_complete", "verify"]
