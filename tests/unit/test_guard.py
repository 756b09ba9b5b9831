"""The guard: a step whose loss or gradient norm is NaN/inf leaves weights and optimizer state as they were and is
counted; after guard.rollback_after such steps in a row the run reloads the last checkpoint and continues with the
data after the bad batches. With a spike rule on, a finite step far above the recent accepted steps (its loss, or
its gradient norm) is skipped and counted likewise, without a rollback."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from test_trainer import tiny

import megatron_pept.trainer as trainer_module
from megatron_pept import guard
from megatron_pept.config import GuardConfig
from megatron_pept.errors import UserError
from megatron_pept.train_state import TrainState
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
    trainer.state.spikes = 2
    trainer.train()
    trainer.close()
    resumed = Trainer(tiny(quickstart_data, tmp_path, "train.steps=4", "checkpoint.interval=2"))
    assert resumed.state.guard_counters() == {
        "skipped_steps": 3,
        "rollbacks": 2,
        "bad_steps_in_a_row": 0,
        "rollback_target": 6,
        "rollbacks_to_target": 1,
        "spikes": 2,
    }


# -- the spike rules: pure functions ------------------------------------------------------------------------------


def window_of(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)


def test_the_loss_limit_is_the_mean_plus_sigma_population_stds() -> None:
    losses = torch.tensor([2.0, 4, 4, 4, 5, 5, 7, 9], dtype=torch.float64)  # mean 5, population std 2 (sample: 2.14)
    assert guard.loss_limit(losses, sigma=3.0) == 11.0
    assert guard.loss_limit(losses, sigma=0.5) == 6.0


def test_the_grad_norm_limit_is_the_ratio_times_the_median() -> None:
    assert guard.grad_norm_limit(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), ratio=10.0) == 20.0
    # an even window: the lower middle value (2), not the mean of the two middle ones (2.5)
    assert guard.grad_norm_limit(torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64), ratio=10.0) == 20.0
    # one huge norm in the window moves the median by one place only
    assert guard.grad_norm_limit(torch.tensor([1.0, 1e9, 2.0], dtype=torch.float64), ratio=10.0) == 20.0


def test_the_spike_rules_are_off_by_default_and_warm_up_on_a_full_window() -> None:
    full = window_of(*[(5.0 + (i % 2), 1.0 + (i % 3)) for i in range(4)])  # losses 5 6 5 6, norms 1 2 3 1
    assert guard.spike_limits(GuardConfig(), window_of(*[(5.0, 1.0)] * 100)) == (math.inf, math.inf)
    on = GuardConfig(spike_loss_sigma=2.0, spike_grad_norm_ratio=10.0, spike_window=4)
    assert guard.spike_limits(on, full[:3]) == (math.inf, math.inf)  # 3 accepted steps of 4: warming up
    assert guard.spike_limits(on, full) == (6.5, 10.0)  # 5.5 + 2 x 0.5; 10 x median(1, 2, 3, 1) = 10 x 1
    assert guard.spike_limits(GuardConfig(spike_loss_sigma=2.0, spike_window=4), full) == (6.5, math.inf)
    assert guard.spike_limits(GuardConfig(spike_grad_norm_ratio=10.0, spike_window=4), full) == (math.inf, 10.0)
    # a longer window (guard.spike_window lowered on resume): the newest steps count
    assert guard.spike_limits(on, torch.cat([window_of((100.0, 100.0)), full])) == (6.5, 10.0)
    assert guard.spike_limits(GuardConfig(enabled=False, spike_loss_sigma=2.0, spike_window=4), full)[0] == math.inf


def test_judge_puts_non_finite_first_and_a_spike_is_strictly_above_its_limit() -> None:
    cfg = GuardConfig(spike_loss_sigma=2.0, spike_grad_norm_ratio=10.0, spike_window=4)
    state = TrainState(accepted_window=window_of((5.0, 1.0), (6.0, 2.0), (5.0, 3.0), (6.0, 1.0)))
    assert guard.judge(cfg, state, loss=6.5, grad_norm=10.0) == guard.Verdict(guard.ACCEPTED, 6.5, 10.0)
    assert guard.judge(cfg, state, loss=6.5000001, grad_norm=1.0).kind == guard.SPIKE
    assert guard.judge(cfg, state, loss=5.0, grad_norm=10.0000001).kind == guard.SPIKE
    assert guard.judge(cfg, state, loss=float("nan"), grad_norm=1.0).kind == guard.NONFINITE
    assert guard.judge(cfg, state, loss=5.0, grad_norm=float("inf")).kind == guard.NONFINITE
    assert guard.judge(GuardConfig(), state, loss=1e9, grad_norm=1e9).kind == guard.ACCEPTED  # rules off


def run_sequence(cfg: GuardConfig, state: TrainState, steps: list[tuple[float, float]]) -> list[str]:
    kinds = []
    for loss, grad_norm in steps:
        verdict = guard.judge(cfg, state, loss=loss, grad_norm=grad_norm)
        guard.count_step(cfg, state, verdict, step=state.step, loss=loss, grad_norm=grad_norm)
        state.step += 1
        kinds.append(verdict.kind)
    return kinds


def test_only_accepted_steps_feed_the_window_and_spikes_do_not_make_a_non_finite_streak() -> None:
    cfg = GuardConfig(spike_loss_sigma=3.0, spike_window=3)
    state = TrainState()
    nan = float("nan")
    kinds = run_sequence(cfg, state, [(4.0, 1.0), (5.0, 1.0), (6.0, 1.0), (9.0, 1.0), (nan, 1.0), (50.0, 1.0)])
    # limit after 4 5 6: 5 + 3 x 0.8165 = 7.449: 9 and 50 are spikes, neither enters the window
    assert kinds == ["accepted"] * 3 + ["spike", "nonfinite", "spike"]
    assert torch.equal(state.accepted_window, window_of((4.0, 1.0), (5.0, 1.0), (6.0, 1.0)))
    assert (state.spikes, state.skipped_steps, state.spikes_in_a_row, state.bad_steps_in_a_row) == (2, 3, 2, 1)
    assert run_sequence(cfg, state, [(7.0, 1.0)]) == ["accepted"]  # resets both streaks, slides the window
    assert torch.equal(state.accepted_window, window_of((5.0, 1.0), (6.0, 1.0), (7.0, 1.0)))
    assert (state.spikes, state.skipped_steps, state.spikes_in_a_row, state.bad_steps_in_a_row) == (2, 3, 0, 0)


def test_a_disabled_guard_keeps_non_finite_values_out_of_the_window() -> None:
    cfg, state = GuardConfig(enabled=False), TrainState()
    assert run_sequence(cfg, state, [(4.0, 1.0), (float("nan"), 1.0), (5.0, float("inf"))]) == ["accepted"] * 3
    assert torch.equal(state.accepted_window, window_of((4.0, 1.0)))


def test_a_window_of_spikes_in_a_row_stops_the_run() -> None:
    """The loss has moved to a level the window never saw: rather than skip every step from here on (training on
    nothing), the run stops at the guard.spike_window-th spike in a row with one line naming the step."""
    cfg = GuardConfig(spike_grad_norm_ratio=2.0, spike_window=3)
    state = TrainState()
    assert run_sequence(cfg, state, [(4.0, 1.0)] * 3 + [(4.0, 5.0)] * 2) == ["accepted"] * 3 + ["spike"] * 2
    with pytest.raises(FloatingPointError, match=r"^step 6: gradient norm 5 > 2 .*3 spikes in a row.*after step 3,"):
        run_sequence(cfg, state, [(4.0, 5.0)])


# -- the spike rules in a run: a garbage batch ---------------------------------------------------------------------

SPIKE_RULES = {
    "loss": ["guard.spike_loss_sigma=3", "guard.spike_window=4"],
    "grad_norm": ["guard.spike_grad_norm_ratio=5", "guard.spike_window=4"],
}


def feed_garbage(trainer: Trainer, steps: set[int]) -> None:
    """Replace both micro-batches of the given (1-based) optimizer steps by a batch of one repeated token (the last
    id of the vocabulary): a corrupt stretch of a shard. The loader still advances as usual."""
    real, calls = trainer.loader.next_batch, {"n": 0}
    token = trainer.data_index.vocab_size - 1

    def next_batch():
        inputs, targets = real()
        calls["n"] += 1
        if (calls["n"] - 1) // trainer.grad_accum_steps + 1 in steps:
            return torch.full_like(inputs, token), torch.full_like(targets, token)
        return inputs, targets

    trainer.loader.next_batch = next_batch


def logged_scalars(trainer: Trainer) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    real = trainer.writer.scalars

    def scalars(step: int, values: dict[str, float]) -> None:
        out.setdefault(step, {}).update(values)
        real(step, values)

    trainer.writer.scalars = scalars
    return out


@pytest.fixture
def warnings_seen():
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("megatron_pept")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("rule", list(SPIKE_RULES))
def test_a_garbage_batch_is_skipped_with_the_spike_rule_and_applied_without(
    rule: str, quickstart_data: Path, tmp_path: Path, warnings_seen: list[str]
) -> None:
    runs = {}
    for on in (True, False):
        trainer = Trainer(
            tiny(quickstart_data, tmp_path / str(on), "train.steps=10", *SPIKE_RULES[rule][: 2 if on else 0])
        )
        feed_garbage(trainer, {9})
        scalars = logged_scalars(trainer)
        losses = [trainer.train_step()[0] for _ in range(8)]
        before, window = params_and_moments(trainer), trainer.state.accepted_window.clone()
        loss, grad_norm, _ = trainer.train_step()
        after = params_and_moments(trainer)
        runs[on] = losses
        if on:
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the update was not applied
            assert torch.equal(trainer.state.accepted_window, window)  # nor did the spike enter the statistics
            assert (trainer.state.spikes, trainer.state.skipped_steps, trainer.state.bad_steps_in_a_row) == (1, 1, 0)
            assert scalars[9] == {"guard/skipped_steps": 1.0, "guard/spikes": 1.0}
            limit = guard.spike_limits(trainer.cfg.guard, window)[0 if rule == "loss" else 1]
            value = loss if rule == "loss" else grad_norm
            assert value > limit and f"{value:.6g} > {limit:.6g}" in warnings_seen[-1]
            assert warnings_seen[-1].startswith("step 9: spike: ") and "update skipped" in warnings_seen[-1]
            trainer.train_step()  # the next batch is good: it updates again
            assert trainer.state.spikes_in_a_row == 0 and trainer.state.accepted_window.shape == (4, 2)
            assert not torch.equal(trainer.raw_model.model.embed_tokens.weight, before[0])
        else:
            assert not any(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            assert trainer.state.spikes == 0 and trainer.state.skipped_steps == 0 and scalars[9] == {}
        trainer.close()
    assert runs[True] == runs[False]  # the rule judged steps 5-8 and let them all through


@pytest.mark.parametrize("stop", [5, 9])  # the window full before the garbage step (7), and after its skip
def test_resume_keeps_the_spike_statistics(stop: int, quickstart_data: Path, tmp_path: Path) -> None:
    rules = ["guard.spike_loss_sigma=3", "guard.spike_grad_norm_ratio=5", "guard.spike_window=4"]
    extra = [*rules, "train.steps=11", "checkpoint.interval=100"]
    whole = Trainer(tiny(quickstart_data, tmp_path / "whole", *extra))
    feed_garbage(whole, {7})
    result = whole.train()
    losses = result.train_losses
    assert result.spikes == 1 and result.skipped_steps == 1
    cut = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra))
    feed_garbage(cut, {7})
    for _ in range(stop):
        cut.train_step()
    cut.save_checkpoint()
    cut.close()
    resumed = Trainer(tiny(quickstart_data, tmp_path / "cut", *extra))
    feed_garbage(resumed, {7 - stop})  # counted from the resumed run's first step
    assert torch.equal(resumed.state.accepted_window, cut.state.accepted_window)
    assert resumed.train().train_losses == losses[stop:]
    assert torch.equal(resumed.state.accepted_window, whole.state.accepted_window)
    assert (resumed.state.spikes, resumed.state.skipped_steps) == (1, 1)
    final = dict(resumed.raw_model.named_parameters())
    for name, value in whole.raw_model.named_parameters():
        assert torch.equal(final[name], value), name


def test_a_checkpoint_from_before_the_spike_rules_resumes_with_them(
    quickstart_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turning the rule on when resuming a checkpoint that has none of its state (saved by an earlier version):
    it loads, and the rule warms up from there."""
    real = TrainState.state_dict
    monkeypatch.setattr(
        TrainState, "state_dict", lambda self: {k: v for k, v in real(self).items() if k not in TrainState.ADDED_KEYS}
    )
    old = Trainer(tiny(quickstart_data, tmp_path, "train.steps=2", "checkpoint.interval=2"))
    old.train()
    old.close()
    monkeypatch.undo()
    resumed = Trainer(
        tiny(quickstart_data, tmp_path, "train.steps=4", "guard.spike_loss_sigma=6", "guard.spike_window=2")
    )
    assert resumed.state.step == 2 and resumed.state.accepted_window.shape == (0, 2) and resumed.state.spikes == 0
    resumed.train()
    assert resumed.state.accepted_window.shape == (2, 2)


def test_the_window_starts_again_when_the_method_switches_optimizer(quickstart_data: Path, tmp_path: Path) -> None:
    """ReLoRA's warm start ends after step 3: from then on only the adapters train, whose gradient norm has another
    scale than the full model's; the rule warms up again on them."""
    relora = ["method.name=relora", "method.rank=4", "method.warm_start_steps=3", "guard.spike_grad_norm_ratio=10"]
    trainer = Trainer(tiny(quickstart_data, tmp_path, *relora, "guard.spike_window=8", "train.steps=5"))
    sizes = []
    for _ in range(5):
        trainer.train_step()
        sizes.append(trainer.state.accepted_window.shape[0])
    assert sizes == [1, 2, 0, 1, 2]
