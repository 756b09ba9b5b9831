"""What the GPU check reports: the :class:`GpuCheckResult` (its JSON record), the one table on stdout
(:func:`format_table`), and the error of a real check on a machine without a CUDA device."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from megatron_pept.bench.gpu_check.settings import GpuCheckSettings
from megatron_pept.bench.gpu_check.verdicts import DRY, FAIL, PASS, SKIP, Row, exit_code

NO_CUDA_LINE = (
    "no CUDA device: the real check needs one and fails without it (a GPU job that lost its GPU must not pass); use "
    "--dry-run to check the plumbing on CPU"
)
"""What the real check says (the tool prints ``PROG: error: NO_CUDA_LINE [(why)]``, one line, exit 2) when
``torch.cuda.is_available()`` is False: no GPU, a driver that does not load, ``CUDA_VISIBLE_DEVICES`` empty."""


@dataclass
class GpuCheckResult:
    settings: GpuCheckSettings
    device: str
    torch_version: str
    rows: list[Row]
    seconds: float

    @property
    def exit_code(self) -> int:
        return exit_code(self.rows)

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        return {
            "mode": "dry-run" if self.settings.dry_run else "real",
            "device": self.device,
            "torch": self.torch_version,
            "settings": settings,
            "rows": [r.to_dict() for r in self.rows],
            "summary": dict(Counter(r.status for r in self.rows)),
            "exit_code": self.exit_code,
            "seconds": self.seconds,
        }


def format_table(result: GpuCheckResult) -> str:
    """The one table: a title line, the rows, a summary line."""
    s = result.settings
    mode = "DRY RUN on CPU: plumbing only, targets not judged" if s.dry_run else "targets judged"
    title = (
        f"gpu_check ({mode}): {result.device}, torch {result.torch_version}, {s.dtype}; throughput: {s.model}, "
        f"{s.micro_batch} x {s.seq_len} tokens/step, {s.warmup_steps} warm-up + {s.timed_steps} timed steps"
    )
    header = ("check", "backend", "measured", "target", "status", "note")
    lines = []
    for r in result.rows:
        target = r.target_text
        if s.dry_run and r.checks:
            target = f"dry ({target})"
        note = r.error or r.skipped or r.note
        if r.error:
            note = f"error: {note}"
        lines.append((r.check, r.backend, r.measured or "-", target, r.status, note))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    counts = Counter(r.status for r in result.rows)
    summary = ", ".join(f"{counts[k]} {k}" for k in (PASS, FAIL, SKIP, DRY) if counts[k])
    out = [title, fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) for line in lines]
    out.append(f"{summary or 'no rows'}; {result.seconds:.0f} s; exit {result.exit_code}")
    return "\n".join(out)
