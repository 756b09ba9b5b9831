"""A method study: several methods on the same model, data and token budget, each at the best learning rate of
its own grid, with quality (validation loss, perplexity, bits per byte), trainable parameters, the peak-memory
split and throughput in one table, each also as a ratio to a baseline method (``full``).

The spec's format is in :mod:`megatron_pept.study.spec`; the tables are written by :mod:`megatron_pept.study.report`.

Layout of the output folder: ``grid/<label>/lr<lr>/`` and ``final/<label>/`` are ordinary run folders
(checkpoints, TensorBoard events, config.yaml) with a ``result.json`` once finished;
``final/<label>_seed<N>/`` for each extra seed; ``probes/<label>.json`` (memory split and speed);
``study.json`` and ``study.md``. Rerunning the same command skips every run with a ``result.json``, resumes a
half-finished run from its last checkpoint, and rebuilds the tables.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_pept.study.report import write_json, write_tables
from megatron_pept.study.spec import MethodSpec, StudyError, StudySpec

RESULT_FILE = "result.json"


def lr_folder(lr: float) -> str:
    return f"lr{lr:.3g}"


def bits_per_byte(val_loss: float, *, target_tokens: int, target_bytes: int) -> float:
    """Nats per token -> bits per byte of the text those tokens encode."""
    return val_loss * target_tokens / (math.log(2) * max(target_bytes, 1))


def validation_bytes(trainer: Any) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of the targets the trainer's validation scores: each window's targets decoded with
    the data's tokenizer (a window that starts inside a word may lose its leading space: at most one byte per
    window)."""
    from megatron_pept.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(trainer.cfg.data.path) / trainer.data_index.tokenizer_file)
    tokens = nbytes = 0
    for _, targets, weights in trainer.val_batches:
        for window, weight in zip(targets.tolist(), weights.tolist()):
            if weight <= 0:
                continue
            tokens += len(window)
            nbytes += len(tokenizer.decode(window).encode("utf-8"))
    return tokens, nbytes


def median_tokens_per_sec(run_dir: Path, *, skip_first: int = 2) -> float:
    """Median of the per-step ``perf/tokens_per_sec`` of a run (the first steps, which warm caches, left out;
    steps that also validated or saved are slower and the median ignores them). Shares the machine with whatever
    else ran: the study's speed figures come from :func:`probe`."""
    from megatron_pept.study.plots import read_run

    steps, values = read_run(run_dir).series.get("perf/tokens_per_sec", ([], []))
    kept = [v for step, v in zip(steps, values) if step > skip_first] or values
    return statistics.median(kept) if kept else float("nan")


def train_run(config: str, overrides: list[str], run_dir: Path, *, what: str, train: bool = True) -> dict[str, Any]:
    """One run to its end (resuming it if it has a checkpoint); its result, also kept in ``result.json``. With
    ``train=False`` only a finished run's result, else a :class:`_Unfinished`."""
    done = run_dir / RESULT_FILE
    if done.is_file():
        if train:  # a method left out by --only is only read back: no line for each of its runs
            _log(f"{what}: finished before, kept ({done})")
        return json.loads(done.read_text())
    if not train:
        raise _Unfinished(what)
    _log(f"{what}: training in {run_dir}")
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    cfg = load_config(config, [*overrides, f"run_dir={run_dir}"])
    started = time.perf_counter()
    with Trainer(cfg) as trainer:
        result = trainer.train()
        if result.interrupted:
            raise StudyError(f"run {run_dir} stopped by a signal at step {result.steps}; rerun the study to resume it")
        if not result.val_losses:
            raise StudyError(f"run {run_dir} ended without a validation loss; keep train.eval_interval > 0")
        last = max(result.val_losses)
        val_loss = result.val_losses[last]
        tokens, nbytes = validation_bytes(trainer)
        trainable = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.raw_model.parameters())
    record = {
        "run_dir": str(run_dir),
        "overrides": overrides,
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss < 50 else float("inf"),
        "val_losses": {str(k): v for k, v in sorted(result.val_losses.items())},
        "val_tokens": tokens,
        "val_bytes": nbytes,
        "bits_per_byte": bits_per_byte(val_loss, target_tokens=tokens, target_bytes=nbytes),
        "trainable_params": trainable,
        "params": total,
        "tokens_per_sec": median_tokens_per_sec(run_dir),
        "resumed_from": result.resumed_from,
        "seconds_this_session": time.perf_counter() - started,
        "load_average": os.getloadavg()[0],
    }
    write_json(done, record)
    return record


MEMORY_STEPS = 3


def probe(config: str, overrides: list[str], steps: int, out: Path, *, train: bool = True) -> dict[str, Any]:
    """Memory and speed of a method, from a fresh run (no checkpoint, no TensorBoard, no validation): the
    peak-memory split of its first ``MEMORY_STEPS`` steps (MemTracker against the allocator), then the median
    time of ``steps`` more steps, timed back to back in one process (the study's runs are long and share the
    machine with whatever else runs; these few steps are its throughput figures). ``train=False``: only one
    measured before, else a :class:`_Unfinished`."""
    if out.is_file():
        return json.loads(out.read_text())
    if not train:
        raise _Unfinished(f"memory and speed probe {out}")
    import contextlib
    import shutil
    import tempfile

    import torch

    from megatron_pept.config import load_config
    from megatron_pept.study.memory import AllocatorPeak, split_from_snapshot, tracked_steps
    from megatron_pept.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="probe-", dir=out.parent))
    try:
        cfg = load_config(
            config,
            [*overrides, f"run_dir={run_dir}", "checkpoint.interval=0", "metrics.tensorboard=false"],
        )
        with contextlib.ExitStack() as stack:
            measured = stack.enter_context(AllocatorPeak(cfg_device(cfg)))
            trainer = stack.enter_context(Trainer(cfg))
            with tracked_steps(trainer.raw_model, [trainer.optimizer], trainer.device) as peak_snapshot:
                for _ in range(MEMORY_STEPS):
                    trainer.train_step()
                parts, largest = peak_snapshot()
            stack.pop_all().__exit__(None, None, None)  # trainer closes, then the allocator count ends
        split = split_from_snapshot(parts, largest, measured.peak)
        with Trainer(cfg) as trainer:
            seconds = []
            for _ in range(steps):
                started = time.perf_counter()
                trainer.train_step()
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize(trainer.device)
                seconds.append(time.perf_counter() - started)
            tokens_per_step, device = trainer.tokens_per_step, str(trainer.device)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    step_seconds = statistics.median(seconds[2:] if len(seconds) > 4 else seconds)
    record = {
        "device": device,
        "overrides": overrides,
        "memory_steps": MEMORY_STEPS,
        "speed_steps": steps,
        "step_seconds": step_seconds,
        "tokens_per_sec": tokens_per_step / step_seconds,
        "load_average": os.getloadavg()[0],
        **split.as_dict(),
    }
    write_json(out, record)
    return record


def cfg_device(cfg: Any) -> Any:
    import torch

    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def final_seed(config: str, overrides: list[str]) -> int:
    """The train.seed a method's grid and final runs train with (its config and overrides)."""
    from megatron_pept.config import load_config

    return int(load_config(config, overrides).train.seed)


def _log(message: str) -> None:
    print(f"study: {message}", flush=True)


class _Unfinished(Exception):
    """A method left out by ``--only`` has a run (named here) that is not finished: it has no row yet."""


def set_aside_if_stale(run_dir: Path, lr: float, stale: Path, *, train: bool = True) -> None:
    """A final run (finished or not) trained at another learning rate than the grid's best now (the grid was
    extended, say) moves to ``stale/`` instead of being resumed or reused (``train=False``: is left where it is
    and counts as unfinished)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return
    used = float((yaml.safe_load(config.read_text()) or {}).get("optim", {}).get("lr", lr))
    if math.isclose(used, lr, rel_tol=1e-9):
        return
    if not train:
        raise _Unfinished(f"{run_dir} (trained at lr {used:g}, the grid's best is now {lr:g})")
    stale.mkdir(parents=True, exist_ok=True)
    target = stale / f"{run_dir.name}-lr{used:.3g}"
    _log(f"{run_dir} trained at lr {used:g}, the grid's best is now {lr:g}: moved to {target}")
    os.replace(run_dir, target)


def run_study(spec: StudySpec, output: Path, *, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or finish) the study and write ``study.json`` and ``study.md`` into ``output``. With ``only``, only
    those methods train; every other method whose runs all finished earlier keeps its row (in spec order), so the
    tables are the ones a run without ``only`` writes; one with a run still missing is left out, with a log line."""
    labels = [m.label for m in spec.methods]
    unknown = sorted(set(only or []) - set(labels))
    if unknown:
        raise StudyError(f"--only {', '.join(unknown)}: not in the spec (its labels: {', '.join(labels)})")
    if output.exists() and not output.is_dir():
        raise StudyError(f"--output {output} is a file; give a folder")
    output.mkdir(parents=True, exist_ok=True)
    common = [*spec.overrides, f"checkpoint.interval={spec.checkpoint_interval}", "checkpoint.keep_last=1"]
    bases = {m.label: [*common, f"method.name={m.name}", *m.overrides] for m in spec.methods}
    first_seed = {m.label: final_seed(spec.config, bases[m.label]) for m in spec.methods if m.seeds}
    for method in spec.methods:
        if method.seeds and first_seed[method.label] in method.seeds:
            raise StudyError(
                f"{method.label}: seeds lists {first_seed[method.label]}, the seed of its final run already "
                "(train.seed of the config and overrides); list only the other seeds"
            )
    rows: dict[str, Any] = {}
    for method in spec.methods:
        train = not only or method.label in only
        try:
            rows[method.label] = _method_row(
                spec, output, method, bases[method.label], first_seed.get(method.label), train=train
            )
        except _Unfinished as missing:
            _log(f"{method.label}: not in the tables, {missing} has not finished (run it with --only {method.label})")
            continue
        if train:
            write_tables(spec, output, rows)  # after each method, so a study cut short has its tables
    return write_tables(spec, output, rows)


def _method_row(
    spec: StudySpec, output: Path, method: MethodSpec, base: list[str], first_seed: int | None, *, train: bool
) -> dict[str, Any]:
    """One method's grid, final run, seed runs and probe (trained where missing, or with ``train=False`` read
    back if all finished, else :class:`_Unfinished`), as its row of study.json."""
    grid: dict[str, Any] = {}
    for lr in method.lrs:
        run_dir = output / "grid" / method.label / lr_folder(lr)
        overrides = [*base, *method.grid_overrides, f"optim.lr={lr}", f"train.steps={spec.grid_steps}"]
        what = f"{method.label} lr {lr:g} (grid run of {spec.grid_steps} steps)"
        grid[f"{lr:g}"] = train_run(spec.config, overrides, run_dir, what=what, train=train)
    finite = {lr: r for lr, r in grid.items() if math.isfinite(r["val_loss"])}
    if not finite:
        raise StudyError(f"every grid run of {method.label} diverged; lower its lrs")
    best_lr = min(finite, key=lambda lr: finite[lr]["val_loss"])
    edge = best_lr in (f"{min(method.lrs):g}", f"{max(method.lrs):g}") and len(method.lrs) > 1
    if spec.grid_steps == spec.steps:
        final = grid[best_lr]
    else:
        what = f"{method.label} lr {best_lr} (final run of {spec.steps} steps)"
        overrides = [*base, f"optim.lr={best_lr}", f"train.steps={spec.steps}"]
        run_dir = output / "final" / method.label
        set_aside_if_stale(run_dir, float(best_lr), output / "stale", train=train)
        final = train_run(spec.config, overrides, run_dir, what=what, train=train)
    seeds = {str(first_seed): final}
    for seed in method.seeds:  # the final run (a grid run when grid_steps == steps) with another train.seed
        what = f"{method.label} lr {best_lr} seed {seed} (final run of {spec.steps} steps)"
        overrides = [*final["overrides"], f"train.seed={seed}"]
        run_dir = output / "final" / f"{method.label}_seed{seed}"
        set_aside_if_stale(run_dir, float(best_lr), output / "stale", train=train)
        seeds[str(seed)] = train_run(spec.config, overrides, run_dir, what=what, train=train)
    if train:
        (output / "probes").mkdir(exist_ok=True)
        _log(f"{method.label}: memory and speed probe ({MEMORY_STEPS} + {spec.probe_steps} steps)")
    measured = probe(
        spec.config,
        [*base, *method.probe_overrides, f"optim.lr={best_lr}", f"train.steps={spec.steps}"],
        spec.probe_steps,
        output / "probes" / f"{method.label}.json",
        train=train,
    )
    row = {
        "method": method.name,
        "label": method.label,
        "best_lr": float(best_lr),
        "best_lr_at_grid_edge": edge,
        "grid": {lr: r["val_loss"] for lr, r in grid.items()},
        "final": final,
        "probe": measured,
    }
    if method.seeds:
        losses = [r["val_loss"] for r in seeds.values()]
        row["seeds"] = {
            "val_loss": {seed: r["val_loss"] for seed, r in seeds.items()},
            "mean": statistics.fmean(losses),
            "stdev": statistics.stdev(losses),
        }
    return row
