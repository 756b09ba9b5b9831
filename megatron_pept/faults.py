"""Fault injection for fault-tolerance tests: freeze a run at a named point so a test can kill or signal it there.

A test that kills a run "at a random moment" after a guessed sleep passes or fails with the machine's speed (the
run may already be over, or not yet saving). Instead, the test names the moment::

    MEGATRON_PEPT_FAULT=save.marked@5        # rank 0, in the save of step 5, after the marker, before the rename
    MEGATRON_PEPT_FAULT=step.end@3@1         # rank 1, after step 3's update and log line, before its save

When the run reaches that point it prints ``FAULT_FROZEN_LINE`` (with the point and its pid) on stderr and stops
itself with SIGSTOP. The test reads that line from the run's output (observed progress, not a clock), then sends
SIGKILL (the kill lands exactly there) or, for a graceful signal, SIGTERM followed by SIGCONT. With a trailing
``:ERRNO`` (``save.written@3:ENOSPC``) the point raises that OSError instead, as a full disk or a failing device
would at that moment. Without the variable every point is a no-op costing one environment lookup.

Points (``POINTS``), in the order a step passes them:

* ``step.end``: the step's update is done and logged; its validation, checkpoint and stop-signal check are not.
* ``save.async``: an asynchronous save of the step is in flight in the background (not yet committed).
* ``save.state``: inside DCP's write of this rank's shards of a synchronous save (an exception here reaches the
  trainer wrapped by DCP).
* ``save.written``: this rank's shards of the step's checkpoint are on disk, nothing is committed.
* ``save.marked``: the completion marker is written in the temporary folder, which is not renamed yet.
* ``save.renamed``: the folder has its final name; ``latest`` still names the previous checkpoint.
* ``save.committed``: ``latest`` names the new checkpoint; older ones are not pruned yet.

And one outside training:

* ``prepare.encode``: ``megatron-pept-prepare-data``'s tokenizer (a worker process with ``--workers`` > 1) is about
  to encode batch STEP of this invocation (counted from 0); RANK is 0.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

ENV_VAR = "MEGATRON_PEPT_FAULT"
FAULT_FROZEN_LINE = "megatron_pept fault injection: frozen at"
POINTS = (
    "step.end",
    "save.async",
    "save.state",
    "save.written",
    "save.marked",
    "save.renamed",
    "save.committed",
    "prepare.encode",
)


def parse_fault(spec: str) -> tuple[str, int, int, int | None]:
    """``POINT@STEP[@RANK][:ERRNO]`` -> (point, step, rank, errno or None to freeze); rank defaults to 0."""
    where, _, error = spec.partition(":")
    parts = where.split("@")
    code = getattr(errno, error, None) if error else None
    if (
        len(parts) not in (2, 3)
        or parts[0] not in POINTS
        or not all(p.isdigit() for p in parts[1:])
        or (error and not isinstance(code, int))
    ):
        raise ValueError(
            f"{ENV_VAR}={spec!r}: expected POINT@STEP[@RANK][:ERRNO] with POINT one of {', '.join(POINTS)} and "
            "ERRNO a name such as ENOSPC"
        )
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0, code


def fault_point(point: str, *, step: int, rank: int) -> None:
    """Freeze this process here (or raise the named OSError) if ``MEGATRON_PEPT_FAULT`` names this point, step
    and rank."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    assert point in POINTS, point
    at_point, at_step, at_rank, code = parse_fault(spec)
    if (at_point, at_step, at_rank) != (point, step, rank):
        return
    if code is not None:
        raise OSError(code, f"{os.strerror(code)} (injected by {ENV_VAR})")
    sys.stdout.flush()
    sys.stderr.write(f"{FAULT_FROZEN_LINE} {point}@{step}@{rank} (pid {os.getpid()})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops; SIGCONT resumes, SIGKILL ends it here
