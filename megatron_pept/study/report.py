"""The tables of a method study: ``study.json`` (the spec's figures and each method's row) and ``study.md`` (the
results, the peak-memory parts, the ratios to the baseline, the seed runs and the learning-rate grids)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megatron_pept.study.spec import StudySpec


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written beside ``path`` and renamed onto it (no reader sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_tables(spec: StudySpec, output: Path, rows: dict[str, Any]) -> dict[str, Any]:
    study = {
        "spec": str(spec.source),
        "config": spec.config,
        "steps": spec.steps,
        "grid_steps": spec.grid_steps,
        "baseline": spec.baseline,
        "methods": rows,
    }
    write_json(output / "study.json", study)
    (output / "study.md").write_text(study_markdown(study))
    return study


def _ratio(value: float, base: float) -> str:
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def study_markdown(study: dict[str, Any]) -> str:
    """The study's tables: the results, the ratios to the baseline, and the learning-rate grids."""
    rows = study["methods"]
    base = rows.get(study["baseline"])
    mib = 2**20
    lines = [
        f"Steps per final run: {study['steps']}; learning-rate grid runs: {study['grid_steps']} steps.",
        "",
        "| method | lr | val loss | val ppl | bits/byte | trainable params | weights MiB | grads MiB | "
        "optimizer MiB | activations MiB | tracked peak MiB | measured peak MiB | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        f, m = row["final"], row["probe"]
        lr = f"{row['best_lr']:.3g}" + (" (grid edge)" if row["best_lr_at_grid_edge"] else "")
        lines.append(
            f"| {label} | {lr} | {f['val_loss']:.4f} | {f['val_ppl']:.2f} | {f['bits_per_byte']:.4f} | "
            f"{f['trainable_params']:,} | {m['weights'] / mib:.1f} | {m['gradients'] / mib:.1f} | "
            f"{m['optimizer'] / mib:.1f} | {m['activations'] / mib:.1f} | {m['tracked_peak'] / mib:.1f} | "
            f"{m['measured_peak'] / mib:.1f} | {m['tokens_per_sec']:,.0f} |"
        )
    lines += [
        "",
        "Largest size of each part at any moment of a step (the columns of the Approximations paper's Table 3; the "
        "gradients of a step exist after its backward, when its activations are gone, so their sum is more than "
        "the peak; gradients include a layer's incoming gradient while it is accumulated, optimizer state the "
        "optimizer step's own temporaries):",
        "",
        "| method | weights MiB | grads MiB | optimizer MiB | activations MiB | sum MiB |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        m = row["probe"]
        parts = [m.get(f"max_{k}", 0) for k in ("weights", "gradients", "optimizer", "activations")]
        lines.append(f"| {label} | " + " | ".join(f"{p / mib:.1f}" for p in [*parts, sum(parts)]) + " |")
    if base is not None:
        bf, bm = base["final"], base["probe"]
        lines += [
            "",
            f"Ratios to `{study['baseline']}`:",
            "",
            "| method | val loss | bits/byte | trainable params | weights | largest grads | largest optimizer | "
            "activations | measured peak | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, row in rows.items():
            f, m = row["final"], row["probe"]
            cells = [
                _ratio(f["val_loss"], bf["val_loss"]),
                _ratio(f["bits_per_byte"], bf["bits_per_byte"]),
                _ratio(f["trainable_params"], bf["trainable_params"]),
                *(
                    _ratio(m[k], bm[k])
                    for k in ("weights", "max_gradients", "max_optimizer", "activations", "measured_peak")
                ),
                _ratio(m["tokens_per_sec"], bm["tokens_per_sec"]),
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _seed_table(study)
    lrs = sorted({lr for row in rows.values() for lr in row["grid"]}, key=float)
    lines += [
        "",
        f"Validation loss of each learning-rate grid run ({study['grid_steps']} steps; best in bold):",
        "",
        "| method | " + " | ".join(lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for label, row in rows.items():
        cells = []
        for lr in lrs:
            value = row["grid"].get(lr)
            text = "" if value is None else (f"{value:.4f}" if math.isfinite(value) else "diverged")
            cells.append(f"**{text}**" if value is not None and float(lr) == row["best_lr"] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_table(study: dict[str, Any]) -> list[str]:
    """The methods with ``seeds``: each seed's final validation loss, their mean and standard deviation."""
    rows = {label: row for label, row in study["methods"].items() if "seeds" in row}
    if not rows:
        return []
    seeds = sorted({int(seed) for row in rows.values() for seed in row["seeds"]["val_loss"]})
    base = study["methods"].get(study["baseline"])
    base_loss = None if base is None else base.get("seeds", {}).get("mean", base["final"]["val_loss"])
    lines = [
        "",
        "Validation loss of the final runs with other seeds (`train.seed`: initialisation, data order, random "
        "projections), each at its method's best lr:",
        "",
        "| method | lr | "
        + " | ".join(f"seed {seed}" for seed in seeds)
        + " | mean | stdev |"
        + (f" mean vs `{study['baseline']}` |" if base_loss is not None else ""),
        "|---|---|" + "---|" * (len(seeds) + 2 + (base_loss is not None)),
    ]
    for label, row in rows.items():
        losses = row["seeds"]["val_loss"]
        cells = [f"{losses[str(seed)]:.4f}" if str(seed) in losses else "" for seed in seeds]
        cells += [f"{row['seeds']['mean']:.4f}", f"{row['seeds']['stdev']:.4f}"]
        if base_loss is not None:
            cells.append(_ratio(row["seeds"]["mean"], base_loss))
        lines.append(f"| {label} | {row['best_lr']:.3g} | " + " | ".join(cells) + " |")
    return lines
