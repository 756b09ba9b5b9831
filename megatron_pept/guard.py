"""The non-finite guard's bookkeeping: which steps count as bad, the streak and rollback counters (part of
:class:`~megatron_pept.train_state.TrainState`, so they survive a restart), and the cap on rollbacks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from megatron_pept.config import Config, GuardConfig
from megatron_pept.errors import UserError
from megatron_pept.train_state import TrainState

logger = logging.getLogger("megatron_pept")


def finite_step(cfg: GuardConfig, loss: float, grad_norm: float) -> bool:
    """True when the step's loss and gradient norm are finite (the update may proceed), or the guard is off."""
    return not cfg.enabled or (math.isfinite(loss) and math.isfinite(grad_norm))


def count_step(cfg: GuardConfig, state: TrainState, ok: bool, *, step: int, loss: float, grad_norm: float) -> dict:
    """Update the streak after optimizer step ``step`` (0-based); returns the scalars to log (none for a good one)."""
    if ok:
        state.bad_steps_in_a_row = 0
        return {}
    state.bad_steps_in_a_row += 1
    state.skipped_steps += 1
    logger.warning(
        "step %d: loss %s, gradient norm %s: update %s (%d in a row)",
        step + 1,
        loss,
        grad_norm,
        "skipped" if cfg.enabled else "applied",
        state.bad_steps_in_a_row,
    )
    return {"guard/skipped_steps": float(state.skipped_steps), "guard/nonfinite": 1.0}


def rollback_due(cfg: GuardConfig, state: TrainState) -> bool:
    return cfg.enabled and cfg.rollback_after > 0 and state.bad_steps_in_a_row >= cfg.rollback_after


def plan_rollback(cfg: GuardConfig, state: TrainState, *, target: Path, target_step: int) -> dict[str, int]:
    """The guard counters to keep after rolling back to the checkpoint ``target`` (of step ``target_step``);
    raises :class:`FloatingPointError` once the run has gone back to it more than ``guard.max_rollbacks`` times
    (it makes no progress)."""
    counters = state.guard_counters()
    again = counters["rollback_target"] == target_step
    counters["rollbacks_to_target"] = counters["rollbacks_to_target"] + 1 if again else 1
    if counters["rollbacks_to_target"] > cfg.max_rollbacks:
        raise FloatingPointError(
            f"{state.bad_steps_in_a_row} non-finite steps in a row at step {state.step} after "
            f"{counters['rollbacks_to_target'] - 1} rollbacks to {target.name}, the last good checkpoint ({target}); "
            "stopping: lower optim.lr, check the data after that step, or raise guard.max_rollbacks"
        )
    counters["rollbacks"] += 1
    counters["rollback_target"] = target_step
    counters["bad_steps_in_a_row"] = 0
    return counters


def no_rollback_target(cfg: Config, *, bad_steps: int) -> UserError:
    """The error when a rollback is due but the run has no checkpoint of its own to go back to: without periodic
    checkpoints, say to turn them on; with them, that none has been saved yet (the fix is then the lr or the data)."""
    what = (
        f"{bad_steps} steps in a row had a non-finite loss or gradient norm and there is no checkpoint to roll back to"
    )
    if cfg.checkpoint.interval == 0:
        return UserError(f"{what}; set checkpoint.interval, lower optim.lr or check the data")
    return UserError(
        f"{what} (none saved yet: the first is due at step {cfg.checkpoint.interval}); lower optim.lr or check the "
        "data at the start of the run"
    )
