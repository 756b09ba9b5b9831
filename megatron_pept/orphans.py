"""Processes that must not outlive their parent: a training worker whose launcher died, a tokenizer worker whose
``megatron-pept-prepare-data`` died. Killed with SIGKILL (the out-of-memory killer, ``kill -9``), a parent can pass
nothing on, and its children run on as orphans: holding devices, memory and locks, or blocked forever on a queue
whose other end is gone. On Linux the kernel can signal a process when its parent dies (``PR_SET_PDEATHSIG``);
elsewhere this does nothing. No torch here: tokenizer workers import this without it.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def signal_on_parent_death(sig: signal.Signals, parent: int) -> bool:
    """Ask the kernel to send this process ``sig`` when its parent, whose pid was ``parent`` when this process
    started (read it first thing: by now the parent may be gone), dies. A parent already gone gets ``sig`` sent
    now. Returns whether the request was made (False off Linux, or if prctl refused)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    # The kernel signals when the thread that started this process exits (torchrun, DeepSpeed's launcher and the
    # tokenizer pool start theirs from their main thread), and only for a death after this call: check before it.
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
