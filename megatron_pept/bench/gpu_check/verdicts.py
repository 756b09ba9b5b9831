"""Targets and verdicts of the GPU check (pure): a :class:`Target` bounds one measured value, a :class:`Row` is one
line of the table with the (target, value) pairs it is judged by, :func:`resolve_status` gives its PASS/FAIL/SKIP
(or ``dry``) and :func:`exit_code` the tool's exit status; with the arithmetic the bounds and ratios rest on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

PASS, FAIL, SKIP, DRY = "PASS", "FAIL", "SKIP", "dry"
BF16_EPS = torch.finfo(torch.bfloat16).eps


@dataclass(frozen=True)
class Target:
    """A bound on one measured value; ``text`` is how the table shows it."""

    op: str
    bound: float
    text: str

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.op == ">=":
            return value >= self.bound
        if self.op == ">":
            return value > self.bound
        if self.op == "<=":
            return value <= self.bound
        if self.op == "<":
            return value < self.bound
        raise AssertionError(f"unknown comparison {self.op!r}")


@dataclass
class Row:
    """One line of the table: what was measured, the targets it is judged by, and the verdict."""

    id: str
    check: str
    backend: str = "-"
    measured: str = ""
    checks: list[tuple[Target, float]] = field(default_factory=list)
    """(target, value) pairs; the row passes when every one is met."""
    judged: bool = True
    """False where the target does not apply here (e.g. the MFU target on a GPU other than H100/H200)."""
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    status: str = ""

    @property
    def target_text(self) -> str:
        return ", ".join(t.text for t, _ in self.checks) or "-"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "check": self.check,
            "backend": self.backend,
            "measured": self.measured,
            "target": self.target_text,
            "status": self.status,
            "note": self.note,
            "checks": [
                {"op": t.op, "bound": t.bound, "text": t.text, "value": v, "met": t.met(v)} for t, v in self.checks
            ],
            "judged": self.judged,
            "metrics": self.metrics,
            "skipped": self.skipped,
            "error": self.error,
        }


def resolve_status(row: Row, *, dry: bool) -> str:
    """PASS/FAIL/SKIP (or ``dry``) of a row. An error or a non-finite measured value always FAILs, in a dry run
    too (the plumbing is broken); a dry run judges nothing else."""
    if row.error is not None:
        return FAIL
    if row.skipped is not None:
        return SKIP
    if not row.checks or any(not math.isfinite(v) for _, v in row.checks):
        return FAIL
    if dry:
        return DRY
    if not row.judged:
        return SKIP
    return PASS if all(t.met(v) for t, v in row.checks) else FAIL


def exit_code(rows: list[Row]) -> int:
    """1 when any row FAILs, else 0."""
    return 1 if any(r.status == FAIL for r in rows) else 0


def bf16_bound(noise: float, scale: float) -> float:
    """Pass bound of a bf16 result against a reference: twice the reference's own bf16 error ``noise``, at least two
    bf16 ulps of the largest magnitude ``scale`` (so one rounding flip of a large value is never a failure)."""
    return max(2.0 * noise, 2.0 * BF16_EPS * scale)


def amortised_seconds(step_seconds: float, *, one_off_seconds: float, every: int) -> float:
    """Seconds per step when a one-off cost (a projector refresh, a restart) recurs every ``every`` steps."""
    return step_seconds + max(0.0, one_off_seconds) / every
