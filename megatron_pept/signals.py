"""Stop signals: SIGTERM and SIGUSR1 (SLURM's pre-emption warning) ask the run to save and stop at the end of the
step, and the launchers pass them on to the training processes.

In a training process (:class:`StopSignals`, :func:`caught_early`): a stop signal is remembered, the flag is reduced
over the ranks at the end of each step, and every rank saves and exits with code 0 at the same step. One received
before the training loop starts (while the model is built or a checkpoint loaded) is kept for the end of the first
step.

Around a launcher (``python -m megatron_pept.signals torchrun|deepspeed [LAUNCHER ARGS]``, used by
``launch/torchrun.sh``, ``launch/deepspeed.sh`` and ``launch/slurm.sbatch``): the launcher runs in this process as
it would on its own, except that SIGTERM and SIGUSR1 sent to it are passed on to its workers (the processes it
started with ``LOCAL_RANK`` set, however deep below it) instead of killing it. torchrun on its own dies of SIGUSR1
(exit 138), and on SIGTERM forwards the signal, gives the workers 30 s (then SIGKILL) and exits non-zero even when
they saved and exited 0; deepspeed's runner dies of either and leaves its workers running. Here the launcher keeps
running, the workers save and exit 0, and so does the launcher. A signal that arrives before any worker exists is
passed on as soon as one does. SIGINT (Ctrl-C) keeps the launcher's own meaning: stop everything now.
"""

from __future__ import annotations

import collections
import contextlib
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_pept.orphans import signal_on_parent_death

if TYPE_CHECKING:
    import torch

# torch and the collectives are imported where a worker uses them: the launcher wrapper (python -m
# megatron_pept.signals) checks its arguments and starts torchrun or DeepSpeed's launcher without them.

SIGNALS = ("SIGTERM", "SIGUSR1")
_received: list[int] = []  # stop signals this process received while a handler of this module was installed
_early_depth = 0  # > 0 while caught_early() is active: StopSignals takes over what it recorded


def _stop_signals() -> list[signal.Signals]:
    return [getattr(signal, name) for name in SIGNALS if hasattr(signal, name)]


def _record(signum: int, frame: object) -> None:
    _received.append(signum)


def received_signal() -> str | None:
    """The name of the first stop signal this process received (``SIGUSR1``), or None."""
    return signal.Signals(_received[0]).name if _received else None


@contextlib.contextmanager
def caught_early(enabled: bool = True) -> Iterator[None]:
    """Remember a stop signal from now on (the entry point wraps the whole run in this, from the moment the
    configuration is read): a SIGTERM while the model is built or a checkpoint is loaded no longer kills the process
    before it has saved anything; the training loop honours it at the end of its first step. Handlers are restored
    afterwards; nothing is installed outside the main thread or when ``enabled`` is false."""
    global _early_depth
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _record) for sig in _stop_signals()}
    _early_depth += 1
    try:
        yield
    finally:
        _early_depth -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignals:
    """Installed for the training loop (a context manager). The flag is reduced over the ranks each step, so all
    of them stop at the same step even if the signal reached only some. Handlers are installed only in the main
    thread and restored afterwards. Inside :func:`caught_early`, a signal received before the loop counts."""

    SIGNALS = SIGNALS

    def __init__(self, *, enabled: bool, device: torch.device | str = "cpu") -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.device = device  # where the collective's flag lives (the process group's device)
        self.received = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            self.received = _early_depth > 0 and bool(_received)
            for sig in _stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        _record(signum, frame)
        self.received = True

    def requested(self) -> bool:
        """Every rank's answer: did any rank receive a stop signal?"""
        if not self.enabled:
            return False
        from megatron_pept.distributed import comm

        return comm.any_rank(self.received, device=self.device)


def follow_the_launcher(parent: int) -> bool:
    """In a worker of a launcher (``LOCAL_RANK`` set): have the kernel send this process SIGTERM when its parent
    ``parent`` (the torchrun agent or DeepSpeed's per-node launcher, which started it) dies, even of SIGKILL or the
    out-of-memory killer (:mod:`megatron_pept.orphans`). Otherwise the workers of a killed launcher train on as
    orphans, holding the devices and the run_dir lock, and a restart is refused until someone kills them by hand.
    SIGTERM is a stop signal: with ``checkpoint.save_on_signal`` (the default) every rank saves at the end of the
    step and exits, so the restart resumes from there. Returns whether the request was made (not in a single
    process started without a launcher, nor off Linux)."""
    if WORKER_ENV not in os.environ:
        return False
    return signal_on_parent_death(signal.SIGTERM, parent)


# -- launcher side ----------------------------------------------------------------------------------------------

LAUNCHERS = {"torchrun": "torch.distributed.run", "deepspeed": "deepspeed.launcher.runner"}
WORKER_ENV = "LOCAL_RANK"  # set by torchrun and by deepspeed's launcher in each worker's environment
_TORCHRUN_OWN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's default, less the stop signals handled here


def process_children() -> dict[int, list[int]]:
    """Parent pid -> its child pids, from /proc (processes that end meanwhile are skipped)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _is_worker(pid: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(entry.startswith(WORKER_ENV.encode() + b"=") for entry in environ.split(b"\0"))


def worker_pids(root: int | None = None) -> list[int]:
    """The launcher's workers: the first processes down each branch below ``root`` (this process) whose
    environment sets ``LOCAL_RANK``. Their own children (data-loader workers, compile workers) are not included;
    deepspeed's intermediate launcher process is skipped (the launcher of this process runs without the
    variable)."""
    children = process_children()
    found, todo = [], list(children.get(os.getpid() if root is None else root, []))
    while todo:
        pid = todo.pop()
        if _is_worker(pid):
            found.append(pid)
        else:
            todo.extend(children.get(pid, []))
    return sorted(found)


class SignalForwarder:
    """Handlers for SIGTERM and SIGUSR1 that pass them on to the workers. The handler only queues the signal (it
    may interrupt the launcher anywhere); a daemon thread sends it to every worker, now or as soon as workers
    exist, and to workers started later (after a restart), each once."""

    def __init__(self, *, poll_s: float = 0.1) -> None:
        self.poll_s = poll_s
        self._queue: collections.deque[int] = collections.deque()
        self._sent: dict[int, set[int]] = {}  # signal -> workers it was sent to
        self._thread = threading.Thread(target=self._run, name="megatron_pept-signal-forwarder", daemon=True)

    def install(self) -> None:
        for sig in _stop_signals():
            signal.signal(sig, self._handle)
        self._thread.start()

    def _handle(self, signum: int, frame: object) -> None:
        self._queue.append(signum)

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            self.forward_pending()

    def forward_pending(self) -> None:
        while self._queue:
            signum = self._queue.popleft()
            if signum not in self._sent:
                self._sent[signum] = set()
                _say(
                    f"{signal.Signals(signum).name} received: passing it on to the workers, which save a checkpoint "
                    "and stop at the end of the step"
                )
        if not self._sent:
            return
        workers = worker_pids()
        for signum, sent in self._sent.items():
            new = [pid for pid in workers if pid not in sent]
            for pid in new:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(pid, signum)
                sent.add(pid)
            if new:
                _say(f"{signal.Signals(signum).name} sent to worker(s) {', '.join(map(str, new))}")


def _say(message: str) -> None:
    print(f"megatron_pept launcher: {message}", file=sys.stderr, flush=True)


def run_launcher(argv: list[str]) -> int:
    """``python -m megatron_pept.signals torchrun|deepspeed [ARGS]``: that launcher, run in this process with the
    stop signals passed on to its workers (see the module's docstring). Its exit code is the launcher's."""
    usage = f"usage: python -m megatron_pept.signals {{{'|'.join(LAUNCHERS)}}} [LAUNCHER ARGS...]"
    if not argv or argv[0] not in LAUNCHERS:
        got = f"got {argv[0]!r}" if argv else "no launcher named"
        print(f"megatron_pept.signals: error: {got}; {usage}", file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    if name == "torchrun":
        if any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in args):
            print(
                "megatron_pept.signals: error: --signals-to-handle is set here (SIGTERM and SIGUSR1 go to the "
                f"workers, torchrun handles {_TORCHRUN_OWN_SIGNALS}); remove it",
                file=sys.stderr,
            )
            return 2
        args = ["--signals-to-handle", _TORCHRUN_OWN_SIGNALS, *args]
    os.environ.pop(WORKER_ENV, None)  # only the workers have it: that is how they are told apart
    SignalForwarder().install()
    sys.argv = [name, *args]
    runpy.run_module(LAUNCHERS[name], run_name="__main__", alter_sys=True)  # exits with the launcher's code
    return 0


if __name__ == "__main__":
    sys.exit(run_launcher(sys.argv[1:]))
