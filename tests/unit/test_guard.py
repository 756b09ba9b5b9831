"""The non-finite guard: a step whose loss or gradient norm is NaN/inf leaves weights and optimizer state as they
were and is counted; after guard.rollback_after such steps in a row the run reloads the last checkpoint and
continues with the data after the bad batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import tiny

import megatron_pept.trainer as trainer_module
from megatron_pept.errors import UserError
from megatron_pept.trainer import Trainer


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """Make the training loss NaN on the given (1-based) optimizer steps; 2 micro-batches per step."""
    bad_steps: set[int] = set()
    calls = {"n": 0}
    real = trainer_module.cross_entropy_loss

    def loss(logits, targets):
        value = real(logits, targets)
        if not torch.is_grad_enabled():  # validation
            return value
        calls["n"] += 1
        step = (calls["n"] - 1) // 2 + 1
        return value * float("nan") if step in bad_steps else value

    monkeypatch.setattr(trainer_module, "cross_entropy_loss", loss)
    return bad_steps


def params_and_moments(trainer: Trainer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in trainer.raw_model.parameters()]
    for state in trainer.optimizer.state.values():
        out += [v.clone() for v in state.values() if torch.is_tensor(v)]
    return out


def test_a_nan_step_is_skipped_and_counted(poison, quickstart_data: Path, tmp_path: Path) -> None:
    poison.add(3)
    trainer = Trainer(tiny(quickstart_data, tmp_path, "train.steps=6", "guard.rollback_after=0"))
    trainer.train_step(), trainer.train_step()
    before = params_and_moments(trainer)
    loss, grad_norm, _ = trainer.train_step()
    assert loss != loss  # NaN
    after = params_and_moments(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert trainer.state.skipped_steps == 1 and trainer.state.step == 3
    loss, _, _ = trainer.train_step()
    assert loss == loss and trainer.bad_steps_in_a_row == 0
    assert not any(torch.equal(a, b) for a, b in zip(before[:1], params_and_moments(trainer)[:1], strict=True))


def test_nan_steps_in_a_row_roll_back_and_skip_the_bad_batches(poison, quickstart_data, tmp_path) -> None:
    poison.update({5, 6})
    trainer = Trainer(
        tiny(quickstart_data, tmp_path, "train.steps=8", "checkpoint.interval=2", "guard.rollback_after=2")
    )
    result = trainer.train()
    assert result.rollbacks == 1 and result.skipped_steps == 2 and result.steps == 8
    # steps 1-6, back to the checkpoint of step 4, then steps 5-8 on the batches after the bad ones
    assert len(result.train_losses) == 10
    assert all(x != x for x in result.train_losses[4:6]) and all(x == x for x in result.train_losses[6:])
    assert trainer.loader.samples_seen == 10 * 8  # nothing replayed: 10 steps' batches consumed in all


def test_no_checkpoint_to_roll_back_to_is_one_clear_error(poison, quickstart_data: Path, tmp_path: Path) -> None:
    poison.update({1, 2})
    trainer = Trainer(tiny(quickstart_data, tmp_path, "train.steps=4", "guard.rollback_after=2"))
    with pytest.raises(UserError, match="no checkpoint to roll back to"):
        trainer.train()


def test_a_stop_signal_inside_a_nan_streak_saves_nothing(poison, quickstart_data, tmp_path, monkeypatch) -> None:
    """SIGTERM arrives during a streak of non-finite steps: the run stops without saving the bad state, so the
    newest checkpoint stays the last good one (before, the signal's save made the poisoned step `latest`)."""
    import signal

    from megatron_pept.checkpoint import list_checkpoints

    poison.update({5, 6})
    trainer = Trainer(
        tiny(quickstart_data, tmp_path, "train.steps=8", "checkpoint.interval=2", "guard.rollback_after=3")
    )
    real_step = trainer.train_step

    def step_then_signal():
        out = real_step()
        if trainer.state.step == 5:  # the first bad step is done: pre-empt the run now
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    result = trainer.train()
    assert result.interrupted and trainer.state.step == 5 and trainer.state.bad_steps_in_a_row == 1
    root = tmp_path / "checkpoints"
    assert [f.step for f in list_checkpoints(root)] == [4, 2]
    assert (root / "latest").read_text().strip() == "step_00000004"


def test_a_run_that_stays_non_finite_stops_after_the_capped_rollbacks(poison, quickstart_data, tmp_path) -> None:
    """Every step from the 5th on is NaN: two rollbacks to the checkpoint of step 4, then the run stops with one
    error naming the step and that checkpoint; no good checkpoint was pruned (keep_last=1 would have, had a
    poisoned state been saved)."""
    from megatron_pept.checkpoint import list_checkpoints

    poison.update(range(5, 100))
    trainer = Trainer(
        tiny(
            quickstart_data,
            tmp_path,
            "train.steps=20",
            "checkpoint.interval=2",
            "checkpoint.keep_last=1",
            "guard.rollback_after=2",
            "guard.max_rollbacks=2",
        )
    )
    with pytest.raises(FloatingPointError, match=r"at step 6 after 2 rollbacks to step_00000004.*guard.max_rollbacks"):
        trainer.train()
    assert trainer.state.rollbacks == 2 and trainer.state.rollbacks_to_target == 2
    assert [f.step for f in list_checkpoints(tmp_path / "checkpoints")] == [4]


def test_the_guard_counters_are_saved_and_restored(quickstart_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny(quickstart_data, tmp_path, "train.steps=2", "checkpoint.interval=2"))
    trainer.state.skipped_steps, trainer.state.rollbacks = 3, 2
    trainer.state.rollback_target, trainer.state.rollbacks_to_target = 6, 1
    trainer.train()
    trainer.close()
    resumed = Trainer(tiny(quickstart_data, tmp_path, "train.steps=4", "checkpoint.interval=2"))
    assert resumed.state.guard_counters() == {
        "skipped_steps": 3,
        "rollbacks": 2,
        "bad_steps_in_a_row": 0,
        "rollback_target": 6,
        "rollbacks_to_target": 1,
    }
