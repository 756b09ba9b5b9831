"""Step timing: seconds per step, tokens/s, MFU and the time left, with the first step of a run (or of a resume)
kept out of the averages (it pays for warm-up: allocations, compilation, the first collectives)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class StepRates:
    step_seconds: float
    """This step alone."""
    tokens_per_sec: float
    """This step alone (the TensorBoard scalar)."""
    mfu: float
    mean_tokens_per_sec: float
    """Over the steps since the first (the console line)."""
    mean_mfu: float
    eta_seconds: float


class StepTimer:
    def __init__(
        self, *, tokens_per_step: int, flops_per_token: float, peak_flops: float, device: torch.device
    ) -> None:
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.device = device
        self.first_step: int | None = None
        now = time.perf_counter()
        self.since, self.steps, self.last = now, 0, now

    def start(self, step: int) -> None:
        """The run (or its resume) begins at ``step``; the next step to end is ``step + 1``."""
        self.first_step = step + 1
        now = time.perf_counter()
        self.since, self.steps, self.last = now, 0, now

    def step_ended(self, step: int, *, total_steps: int) -> StepRates:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        step_seconds = now - self.last
        self.last = now
        if step == self.first_step:
            self.since, self.steps = now, 0
        else:
            self.steps += 1
        mean = (now - self.since) / self.steps if self.steps else step_seconds
        tokens_per_sec = self.tokens_per_step / max(step_seconds, 1e-9)
        mean_tokens_per_sec = self.tokens_per_step / max(mean, 1e-9)
        return StepRates(
            step_seconds=step_seconds,
            tokens_per_sec=tokens_per_sec,
            mfu=tokens_per_sec * self.flops_per_token / self.peak_flops,
            mean_tokens_per_sec=mean_tokens_per_sec,
            mean_mfu=mean_tokens_per_sec * self.flops_per_token / self.peak_flops,
            eta_seconds=mean * (total_steps - step),
        )
