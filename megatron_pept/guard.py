"""The guard's bookkeeping: which steps count as bad (non-finite, or a finite spike), the streak and rollback
counters (part of :class:`~megatron_pept.train_state.TrainState`, so they survive a restart), the spike rules'
window of accepted steps (saved likewise), and the cap on rollbacks.

A step is judged once its loss and gradient norm are known (the same global values on every data-parallel rank, so
every rank decides alike) and before its update is applied:

* non-finite (``guard.enabled``): skipped, counted, and after ``guard.rollback_after`` of them since the last
  accepted step the run reloads the newest checkpoint;
* a spike (``guard.spike_loss_sigma``, ``guard.spike_grad_norm_ratio``; off by default): a finite loss above the
  mean + sigma * std of the last ``guard.spike_window`` accepted steps' losses, or a gradient norm above ratio x
  their median norm. Skipped and counted (``guard/spikes``, also in ``guard/skipped_steps``), but not toward the
  non-finite streak: a skipped spike leaves weights and moments as they were, so there is nothing to roll back
  (and checkpoints go on being saved). After ``guard.spike_window`` spikes in a row the run stops: the statistics
  no longer describe it, and it would skip every step from then on.

Only accepted steps enter the window, and no step is judged a spike before it is full (the warm-up).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_pept.config import Config, GuardConfig, spike_rule_on
from megatron_pept.errors import UserError
from megatron_pept.train_state import TrainState

logger = logging.getLogger("megatron_pept")

ACCEPTED, NONFINITE, SPIKE = "accepted", "nonfinite", "spike"


@dataclass(frozen=True)
class Verdict:
    """How the guard judged a step (``kind``: accepted, nonfinite or spike), with the spike limits it applied
    (inf for a rule that is off or still warming up)."""

    kind: str
    loss_limit: float = math.inf
    grad_norm_limit: float = math.inf

    @property
    def accepted(self) -> bool:
        return self.kind == ACCEPTED


def finite_step(cfg: GuardConfig, loss: float, grad_norm: float) -> bool:
    """True when the step's loss and gradient norm are finite (the update may proceed), or the guard is off."""
    return not cfg.enabled or (math.isfinite(loss) and math.isfinite(grad_norm))


def loss_limit(losses: torch.Tensor, *, sigma: float) -> float:
    """The highest loss that is not a spike: the mean of ``losses`` plus ``sigma`` population standard deviations."""
    return float(losses.mean() + sigma * losses.std(correction=0))


def grad_norm_limit(grad_norms: torch.Tensor, *, ratio: float) -> float:
    """The highest gradient norm that is not a spike: ``ratio`` times the median of ``grad_norms`` (for an even
    count the lower of the two middle values, an element of the window: exact, with no averaging)."""
    return float(ratio * grad_norms.median())


def spike_limits(cfg: GuardConfig, window: torch.Tensor) -> tuple[float, float]:
    """The (loss, gradient norm) limits for the next step, given the ``(k, 2)`` window of accepted steps' losses and
    norms, oldest first: inf for a rule that is off, and for both while the window holds fewer than
    ``guard.spike_window`` steps."""
    if not (cfg.enabled and spike_rule_on(cfg)) or window.shape[0] < cfg.spike_window:
        return math.inf, math.inf
    recent = window[-cfg.spike_window :]
    return (
        loss_limit(recent[:, 0], sigma=cfg.spike_loss_sigma) if cfg.spike_loss_sigma > 0 else math.inf,
        grad_norm_limit(recent[:, 1], ratio=cfg.spike_grad_norm_ratio) if cfg.spike_grad_norm_ratio > 0 else math.inf,
    )


def judge(cfg: GuardConfig, state: TrainState, *, loss: float, grad_norm: float) -> Verdict:
    """Whether the step with this (global) loss and gradient norm may update: a non-finite one first, then the
    spike rules against the accepted steps before it."""
    if not finite_step(cfg, loss, grad_norm):
        return Verdict(NONFINITE)
    loss_max, grad_norm_max = spike_limits(cfg, state.accepted_window)
    return Verdict(SPIKE if loss > loss_max or grad_norm > grad_norm_max else ACCEPTED, loss_max, grad_norm_max)


class StepJudge:
    """The ``accept`` callback of :meth:`~megatron_pept.distributed.Backend.step` for one step of loss ``loss``:
    judges the step once the backend knows its gradient norm, and keeps the verdict for :meth:`count`."""

    def __init__(self, cfg: GuardConfig, state: TrainState, *, loss: float) -> None:
        self.cfg, self.state, self.loss = cfg, state, loss
        self.verdict: Verdict | None = None

    def __call__(self, grad_norm: float) -> bool:
        assert self.verdict is None, "Backend.step calls accept once a step"
        self.verdict = judge(self.cfg, self.state, loss=self.loss, grad_norm=grad_norm)
        return self.verdict.accepted

    def count(self, *, step: int, grad_norm: float) -> dict:
        """:func:`count_step` with this step's verdict."""
        assert self.verdict is not None, "Backend.step did not call accept"
        return count_step(self.cfg, self.state, self.verdict, step=step, loss=self.loss, grad_norm=grad_norm)


def remember_accepted(cfg: GuardConfig, state: TrainState, *, loss: float, grad_norm: float) -> None:
    """Append an accepted step to the spike rules' window (the newest ``guard.spike_window`` are kept)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return  # an update the disabled guard let through: one NaN would make every later limit NaN (no spikes)
    row = torch.tensor([[loss, grad_norm]], dtype=torch.float64)
    state.accepted_window = torch.cat([state.accepted_window, row])[-cfg.spike_window :].clone()


def forget_window(state: TrainState) -> None:
    """Empty the spike rules' window (they warm up again): called when the run trains another set of parameters,
    whose gradient norm has another scale."""
    state.accepted_window = state.accepted_window[:0].clone()


def count_step(
    cfg: GuardConfig, state: TrainState, verdict: Verdict, *, step: int, loss: float, grad_norm: float
) -> dict:
    """Update the counters after optimizer step ``step`` (0-based); returns the scalars to log (none for a good
    one). Raises :class:`FloatingPointError` at the ``guard.spike_window``-th spike in a row."""
    if verdict.accepted:
        state.bad_steps_in_a_row = 0
        state.spikes_in_a_row = 0
        remember_accepted(cfg, state, loss=loss, grad_norm=grad_norm)
        return {}
    state.skipped_steps += 1
    if verdict.kind == SPIKE:
        return _count_spike(cfg, state, verdict, step=step, loss=loss, grad_norm=grad_norm)
    state.bad_steps_in_a_row += 1
    logger.warning(
        "step %d: loss %s, gradient norm %s: update %s (%d in a row)",
        step + 1,
        loss,
        grad_norm,
        "skipped" if cfg.enabled else "applied",
        state.bad_steps_in_a_row,
    )
    return {"guard/skipped_steps": float(state.skipped_steps), "guard/nonfinite": 1.0}


def _count_spike(
    cfg: GuardConfig, state: TrainState, verdict: Verdict, *, step: int, loss: float, grad_norm: float
) -> dict:
    state.spikes += 1
    state.spikes_in_a_row += 1
    why = []
    if loss > verdict.loss_limit:
        why.append(f"loss {loss:.6g} > {verdict.loss_limit:.6g} (mean + {cfg.spike_loss_sigma:g} std)")
    if grad_norm > verdict.grad_norm_limit:
        why.append(
            f"gradient norm {grad_norm:.6g} > {verdict.grad_norm_limit:.6g} ({cfg.spike_grad_norm_ratio:g} x median)"
        )
    what = f"{' and '.join(why)} of the last {cfg.spike_window} accepted steps"
    if state.spikes_in_a_row >= cfg.spike_window:
        raise FloatingPointError(
            f"step {step + 1}: {what}: {state.spikes_in_a_row} spikes in a row, the run no longer matches its "
            f"statistics; stopping rather than skipping every step: check the data after step "
            f"{step + 1 - state.spikes_in_a_row}, or raise guard.spike_loss_sigma / guard.spike_grad_norm_ratio "
            "(0: off) and resume"
        )
    logger.warning(
        "step %d: spike: %s: update skipped (%d in a row, %d in all)",
        step + 1,
        what,
        state.spikes_in_a_row,
        state.spikes,
    )
    return {"guard/skipped_steps": float(state.skipped_steps), "guard/spikes": float(state.spikes)}


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
