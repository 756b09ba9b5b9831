"""Learning-rate schedules as pure functions of the optimizer step.

A schedule maps the 0-based optimizer step to a multiplier of the peak learning rate. Being a pure function of
the step, it needs no state of its own in a checkpoint: a resumed run recomputes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Schedule = Callable[[int], float]


def warmup_multiplier(step: int, *, warmup_steps: int) -> float:
    """Linear warmup: step 0 gets 1/warmup_steps, step warmup_steps-1 the full rate."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def decay_multiplier(progress: float, *, kind: str, min_ratio: float) -> float:
    """Decay from 1 at ``progress`` 0 to ``min_ratio`` at 1: cosine, linear or constant."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, linear or constant")


@dataclass(frozen=True)
class WarmupDecaySchedule:
    """Linear warmup over ``warmup_steps``, then decay to ``min_ratio`` at ``total_steps``."""

    kind: str
    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_multiplier(step, warmup_steps=self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        return decay_multiplier((step - self.warmup_steps) / span, kind=self.kind, min_ratio=self.min_ratio)


@dataclass(frozen=True)
class JaggedSchedule:
    """ReLoRA's jagged schedule: the ``base`` envelope, except that at each restart step the rate drops to zero
    and rises linearly over ``restart_warmup_steps`` back onto the envelope (reaching ``base(r + warmup)``).

    ``restart_steps`` are the first steps trained with freshly re-initialised adapters.
    """

    base: Schedule
    restart_steps: tuple[int, ...]
    restart_warmup_steps: int

    def __call__(self, step: int) -> float:
        last = None
        for restart in self.restart_steps:
            if restart <= step:
                last = restart
        if last is None or self.restart_warmup_steps <= 0 or step - last >= self.restart_warmup_steps:
            return self.base(step)
        return (step - last) / self.restart_warmup_steps * self.base(last + self.restart_warmup_steps)
