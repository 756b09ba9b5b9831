"""Stop signals: SIGTERM and SIGUSR1 (SLURM's pre-emption warning) ask the run to save and stop at the end of the
step."""

from __future__ import annotations

import signal
import threading

import torch

from megatron_pept.distributed import comm


class StopSignals:
    """Installed for the training loop (a context manager). The flag is reduced over the ranks each step, so all
    of them stop at the same step even if the signal reached only some. Handlers are installed only in the main
    thread and restored afterwards."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, *, enabled: bool, device: torch.device | str = "cpu") -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.device = device  # where the collective's flag lives (the process group's device)
        self.received = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True

    def requested(self) -> bool:
        """Every rank's answer: did any rank receive a stop signal?"""
        if not self.enabled:
            return False
        return comm.any_rank(self.received, device=self.device)
