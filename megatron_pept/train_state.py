"""What a run counts (saved in every checkpoint) and what a finished run reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0
    tokens_seen: int = 0
    last_grad_norm: float = -1.0  # of the previous step; per-layer clipping uses it (-1: none yet)
    skipped_steps: int = 0  # updates skipped by the guard (non-finite steps and spikes), over the whole run
    rollbacks: int = 0  # reloads of the last checkpoint after guard.rollback_after bad steps in a row
    bad_steps_in_a_row: int = 0  # non-finite steps since the last accepted update (no checkpoint saved then)
    rollback_target: int = -1  # the step of the checkpoint the last rollback went back to
    rollbacks_to_target: int = 0  # rollbacks in a row to that same checkpoint (capped by guard.max_rollbacks)
    spikes: int = 0  # updates skipped by the spike rules, over the whole run (also in skipped_steps)
    spikes_in_a_row: int = 0  # spikes since the last accepted update (the run stops at guard.spike_window)
    # (k, 2) float64: loss and gradient norm of the last k <= guard.spike_window accepted steps, oldest first; the
    # spike rules' statistics, exact and saved, so a resumed run judges every step as an uninterrupted one does.
    accepted_window: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64), compare=False)

    GUARD_FIELDS = (
        "skipped_steps",
        "rollbacks",
        "bad_steps_in_a_row",
        "rollback_target",
        "rollbacks_to_target",
        "spikes",
    )
    ADDED_KEYS = ("spikes", "spikes_in_a_row", "accepted_window")
    """Keys of :meth:`state_dict` that checkpoints from before the spike rules lack (they load, keeping these)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(self.step),
            "tokens_seen": torch.tensor(self.tokens_seen),
            "last_grad_norm": torch.tensor(self.last_grad_norm, dtype=torch.float64),
            **{name: torch.tensor(getattr(self, name)) for name in self.GUARD_FIELDS},
            "spikes_in_a_row": torch.tensor(self.spikes_in_a_row),
            "accepted_window": self.accepted_window.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.last_grad_norm = float(state["last_grad_norm"])
        for name in (*self.GUARD_FIELDS, "spikes_in_a_row"):  # checkpoints of earlier versions lack some: keep them
            if name in state:
                setattr(self, name, int(state[name]))
        if "accepted_window" in state:
            self.accepted_window = state["accepted_window"].clone()

    def guard_counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.GUARD_FIELDS}


@dataclass
class TrainResult:
    """What a finished run reports back (also useful to tests)."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    tokens_seen: int = 0
    resumed_from: str | None = None
    interrupted: bool = False  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint
    skipped_steps: int = 0
    rollbacks: int = 0
    spikes: int = 0
