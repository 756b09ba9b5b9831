"""The training curves of several runs in one set of figures, read from their TensorBoard events.

Each run folder holds its event files (written directly in ``run_dir``) and the resolved ``config.yaml``. The
events are read with TensorBoard's own reader, every scalar kept; a step logged twice (a resumed run logs again the
steps after its checkpoint) keeps its last value. Steps become tokens with the run's ``train.global_batch_size x
data.seq_len`` (the tokens one optimizer step consumes), so runs of different batch shapes share one axis.

Figures (PNG; matplotlib's Agg canvas, no pyplot state, so nothing leaks into a caller's session):

* ``loss.png``: ``train/loss`` (optionally a moving average) and ``val/loss``, two panels;
* ``lr.png``: ``train/lr``; ``throughput.png``: ``perf/tokens_per_sec``;
* ``<prefix>.png`` for every other tag prefix present (``relora``, ``galore``, ``guard`` ...), a panel per tag.

Every figure has one legend entry per run, in the same colour in every panel. ``plots.json`` lists the figures,
the tags and runs drawn in each, and each run's tokens per step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_pept.errors import UserError

STANDARD_PREFIXES = ("train", "val", "perf", "mem")
"""Tag prefixes every run logs; any other prefix (a method's or the guard's) gets a figure of its own."""
FIXED_FIGURES: dict[str, tuple[str, ...]] = {
    "loss.png": ("train/loss", "val/loss"),
    "lr.png": ("train/lr",),
    "throughput.png": ("perf/tokens_per_sec",),
}
SMOOTHED_TAG = "train/loss"
MATPLOTLIB_HINT = "pip install 'megatron_pept[study]' (or pip install matplotlib)"


@dataclass
class RunCurves:
    """The scalars of one run: ``series[tag] = (steps, values)``, steps ascending, one value per step."""

    label: str
    run_dir: Path
    tokens_per_step: int
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def tokens(self, tag: str) -> list[int]:
        """The token axis of ``tag``: tokens consumed after each of its steps."""
        return steps_to_tokens(self.series[tag][0], tokens_per_step=self.tokens_per_step)


def last_value_per_step(points: Iterable[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """``(steps, values)`` sorted by step, keeping for a step logged more than once the value logged last."""
    latest: dict[int, float] = {}
    for step, value in points:
        latest[int(step)] = float(value)
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def tokens_per_step(config: Mapping[str, Any], *, source: str = "config") -> int:
    """Tokens one optimizer step consumes: ``train.global_batch_size x data.seq_len`` of a resolved config."""
    try:
        batch = int(config["train"]["global_batch_size"])
        seq_len = int(config["data"]["seq_len"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{source} lacks train.global_batch_size or data.seq_len; give the config.yaml a run wrote"
        ) from None
    if batch <= 0 or seq_len <= 0:
        raise UserError(f"{source}: train.global_batch_size and data.seq_len must be positive")
    return batch * seq_len


def steps_to_tokens(steps: Iterable[int], *, tokens_per_step: int) -> list[int]:
    """Tokens seen after each step (step ``k`` is ``k`` optimizer steps done; step 0 is before training)."""
    return [int(step) * tokens_per_step for step in steps]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start); ``window=1`` returns the values."""
    if window < 1:
        raise UserError(f"--smooth must be 1 or more; got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_file() and ".tfevents." in p.name)


def read_run(run_dir: str | Path, *, label: str | None = None) -> RunCurves:
    """Every scalar of a run folder (its event files and ``config.yaml``), one value per step."""
    from tensorboard.backend.event_processing import event_accumulator

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give the run_dir of a run")
    if not event_files(run_dir):
        raise UserError(
            f"{run_dir} holds no TensorBoard event files (events.out.tfevents.*); give the run_dir of a run trained "
            "with metrics.tensorboard=true"
        )
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} has no config.yaml (the resolved config of the run): steps cannot become tokens")
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{config_file} is unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a YAML mapping; give the config.yaml a run wrote")
    per_step = tokens_per_step(config, source=str(config_file))
    # size_guidance 0 keeps every scalar (the default samples 10,000 per tag). Orphaned events (steps a resumed
    # run or a rollback logged again) are purged by the reader; last_value_per_step drops an exact repeat.
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    series = {
        tag: last_value_per_step((event.step, event.value) for event in acc.Scalars(tag))
        for tag in acc.Tags()["scalars"]
    }
    return RunCurves(label=label or run_dir.name, run_dir=run_dir, tokens_per_step=per_step, series=series)


def default_labels(run_dirs: Sequence[Path]) -> list[str]:
    """The run folders' names, or ``parent/name`` where two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{name}" if names.count(name) > 1 else name for p, name in zip(run_dirs, names)]


def require_matplotlib() -> None:
    """One clear error when the ``study`` extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"plotting needs matplotlib: {MATPLOTLIB_HINT}") from None


def check_output(output: str | Path) -> Path:
    """The output folder, refused early if it is a file (it is created only once there is something to write)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder (it is created if missing)")
    return output


def prepare_output(output: str | Path) -> Path:
    output = check_output(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --output {output} ({err.strerror or err})") from None
    return output


def figure_plan(runs: Sequence[RunCurves]) -> dict[str, list[str]]:
    """Which figures to draw and the tags of each: the fixed figures (with the tags some run has), then one figure
    per other tag prefix present."""
    present = {tag for run in runs for tag in run.series}
    plan = {name: [t for t in tags if t in present] for name, tags in FIXED_FIGURES.items()}
    plan = {name: tags for name, tags in plan.items() if tags}
    prefixes = sorted({tag.split("/", 1)[0] for tag in present if "/" in tag} - set(STANDARD_PREFIXES))
    for prefix in prefixes:
        plan[f"{prefix}.png"] = sorted(tag for tag in present if tag.startswith(prefix + "/"))
    return plan


def plot_runs(
    run_dirs: Sequence[str | Path],
    *,
    output: str | Path,
    labels: Sequence[str] | None = None,
    smooth: int = 1,
) -> dict[str, Any]:
    """Draw the figures of ``run_dirs`` into ``output`` and write ``plots.json``; returns what it wrote.

    ``labels``: one legend name per run (default: the run folders' names). ``smooth``: the window of a trailing
    moving average drawn over the train loss (1: none; the raw curve stays, faint)."""
    run_paths = [Path(p) for p in run_dirs]
    if not run_paths:
        raise UserError("give at least one run_dir")
    if labels is not None and len(labels) != len(run_paths):
        raise UserError(f"{len(labels)} --label for {len(run_paths)} run folders; give one label per run (or none)")
    if smooth < 1:
        raise UserError(f"--smooth must be 1 or more; got {smooth}")
    check_output(output)
    require_matplotlib()
    names = list(labels) if labels is not None else default_labels(run_paths)
    runs = [read_run(path, label=name) for path, name in zip(run_paths, names)]
    out = prepare_output(output)
    figures: dict[str, dict[str, list[str]]] = {}
    for name, tags in figure_plan(runs).items():
        drawn = _draw(runs, tags, path=out / name, smooth=smooth)
        figures[name] = {"tags": tags, "runs": drawn}
    report = {
        "figures": figures,
        "runs": [
            {
                "label": run.label,
                "run_dir": str(run.run_dir),
                "tokens_per_step": run.tokens_per_step,
                "tags": sorted(run.series),
            }
            for run in runs
        ],
        "smooth": smooth,
    }
    (out / "plots.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _draw(runs: Sequence[RunCurves], tags: Sequence[str], *, path: Path, smooth: int) -> list[str]:
    """One figure, a panel per tag, a line per run; returns the labels of the runs drawn in it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    ncols = min(len(tags), 3)
    nrows = math.ceil(len(tags) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    drawn: list[str] = []
    for ax, tag in zip(axes, tags):
        for run in runs:
            if tag not in run.series:
                continue
            tokens, values = run.tokens(tag), run.series[tag][1]
            color = colors[run.label]
            marker = "." if len(values) <= 40 else None
            if tag == SMOOTHED_TAG and smooth > 1:
                ax.plot(tokens, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(tokens, moving_average(values, smooth), color=color, linewidth=1.4)
            else:
                ax.plot(tokens, values, color=color, marker=marker, linewidth=1.4)
            if run.label not in drawn:
                drawn.append(run.label)
        title = f"{tag} (moving average of {smooth})" if tag == SMOOTHED_TAG and smooth > 1 else tag
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    for ax in axes[len(tags) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[run.label], label=run.label) for run in runs if run.label in drawn]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), frameon=False)
    fig.savefig(path, dpi=110)
    return drawn
