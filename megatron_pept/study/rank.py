"""The rank of a training update (ReLoRA, Lialin et al., Figures 3 and 4).

For two checkpoints A and B of one model, every linear layer of the transformer blocks gives the singular values of
its update ``dW = W_B - W_A`` (dense weights: low-rank adapters merged, quantised bases dequantised, exactly as the
Hugging Face export reads them, :func:`megatron_pept.checkpoint.hf_export.dense_state_dict`; nothing is
unpickled). They are grouped by layer type (the module's name: ``q_proj`` ... ``down_proj``) and summarised as the
spectrum averaged over the layers of a type and the number of singular values above a threshold (0.1 in the
paper). A ReLoRA cycle adds at most ``rank`` to that count; a full-rank run's update is of full rank. A base kept
in int8 or NF4 is read dequantised (the function the layer applies), so its requantisation at a restart shows as a
small full-rank part of the update.

``A`` may be ``init:RUN_DIR``: the run's weights before its first step, rebuilt from its ``config.yaml`` the way
the trainer builds them (model on the meta device, the method's conversion, ``init_weights``: each weight from its
own seed derived from ``train.seed``, ``model.init_from`` if set, the method's ``after_init``), without locking or
writing ``RUN_DIR``. The generators draw other numbers on a GPU than on a CPU: rebuild on the device the run trained
on.

Outputs: ``rank_spectra.png`` (a panel per layer type, log scale), ``rank_counts.png`` (bars per pair),
``rank.json`` and ``rank.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_pept.errors import DataError, UserError
from megatron_pept.study.plots import check_output, prepare_output, require_matplotlib

LAYER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_PREFIX = "init:"


@dataclass(frozen=True)
class RankPair:
    """Two checkpoints of one model (``a`` may be ``init:RUN_DIR``), and the legend name of their update."""

    label: str
    a: str
    b: str


@dataclass
class DenseWeights:
    """A model's dense weights (plain LLaMA names, fp32, CPU) and where they came from."""

    source: str
    weights: dict[str, torch.Tensor]
    step: int | None
    method: str | None


def layer_type(name: str, tensor: torch.Tensor) -> str | None:
    """The layer type of a linear weight of a transformer block (the module's name), None for anything else."""
    parts = name.split(".")
    if tensor.ndim != 2 or parts[-1] != "weight" or len(parts) < 3 or "layers" not in parts[:-2]:
        return None
    return parts[-2]


def default_pair_label(checkpoint: str) -> str:
    """The run's name for a checkpoint folder (``run/checkpoints/step_N``), a checkpoints folder or a run_dir."""
    path = Path(checkpoint.removeprefix(INIT_PREFIX)).resolve()
    if path.parent.name == "checkpoints":
        return path.parent.parent.name
    if path.name == "checkpoints":
        return path.parent.name
    return path.name


# -- reading ---------------------------------------------------------------------------------------------------


def initial_model(run_dir: str | Path, *, device: str = "auto") -> tuple[Any, Any]:
    """``(model, method)`` of a run as they are before its first step, rebuilt from ``run_dir/config.yaml`` as the
    trainer builds them (see the module docstring), on one device, not parallelised. ``device``: ``auto`` picks it
    as the trainer does (``train.device``)."""
    from megatron_pept.config import load_config
    from megatron_pept.distributed import resolve_device
    from megatron_pept.methods import build_method
    from megatron_pept.models import build_model
    from megatron_pept.trainer import initialise_model

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{INIT_PREFIX}{run_dir}: no {config_file}; init: takes the run_dir of a run (its config.yaml)")
    cfg = load_config(config_file)
    # The attention kernel holds no weights: sdpa rebuilds a flash or te run's initial model on any machine.
    args = dataclasses.replace(_initial_model_args(cfg, run_dir), attention="sdpa")
    if device == "auto":
        dev = resolve_device(cfg.train)
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--init-device cuda but no CUDA device is visible; use cpu or auto")
    else:
        dev = torch.device(device)
    seed = cfg.train.seed
    method = build_method(cfg.method, optim_cfg=cfg.optim, total_steps=cfg.train.steps, seed=seed)
    model = build_model(args)
    method.convert(model)
    # The trainer's own initialisation (Trainer._build): global seed, each weight from its own seed, optional
    # Hugging Face weights, the method's after_init. The caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        initialise_model(model, seed=seed, device=dev, init_from=cfg.model.init_from, method=method)
    return model, method


def initial_weights(run_dir: str | Path, *, device: str = "auto") -> DenseWeights:
    """The dense weights (adapters merged, fp32, CPU) of a run before its first step (:func:`initial_model`)."""
    model, method = initial_model(run_dir, device=device)
    with torch.no_grad():
        dense = {name: value.detach().cpu() for name, value in method.export_weights(model).items()}
    return DenseWeights(source=f"{INIT_PREFIX}{run_dir}", weights=dense, step=0, method=method.name)


def _initial_model_args(cfg: Any, run_dir: Path) -> Any:
    """The run's model arguments: its vocabulary size is ``model.vocab_size``, else the one a checkpoint of the run
    recorded, else the data index's (as the trainer resolves it)."""
    from megatron_pept.checkpoint import checkpoint_root, list_checkpoints
    from megatron_pept.checkpoint.export import read_meta
    from megatron_pept.data.shards import read_index
    from megatron_pept.models import llama_args

    vocab = cfg.model.vocab_size
    if vocab is None:
        for found in list_checkpoints(checkpoint_root(cfg.checkpoint, run_dir=run_dir)):
            saved = read_meta(found.path).get("model_args", {})
            if isinstance(saved, dict) and isinstance(saved.get("vocab_size"), int):
                vocab = saved["vocab_size"]
                break
    if vocab is None:
        d = cfg.data
        primary = Path(d.path) if d.path else (Path(d.blend[0].path) if d.blend else run_dir / "data")
        try:
            vocab = read_index(primary).vocab_size
        except DataError as err:
            raise UserError(
                f"{INIT_PREFIX}{run_dir}: the vocabulary size comes from the run's data index, which cannot be read "
                f"({err}); run from the folder the run was started in"
            ) from None
    return llama_args(cfg.model, vocab_size=vocab, max_seq_len=cfg.data.seq_len)


def load_dense(spec: str, *, init_device: str = "auto") -> DenseWeights:
    """The dense weights of ``spec``: a checkpoint folder, a checkpoints folder or run_dir (its newest complete
    checkpoint), or ``init:RUN_DIR``."""
    from megatron_pept.checkpoint.hf_export import dense_state_dict
    from megatron_pept.checkpoint.store import resolve_checkpoint

    if spec.startswith(INIT_PREFIX):
        return initial_weights(spec[len(INIT_PREFIX) :], device=init_device)
    path = resolve_checkpoint(spec)
    _, dense, meta = dense_state_dict(path)
    step = meta.get("step")
    return DenseWeights(
        source=str(path), weights=dense, step=step if isinstance(step, int) else None, method=meta.get("method")
    )


# -- the math ----------------------------------------------------------------------------------------------------


def check_same_model(a: DenseWeights, b: DenseWeights, *, label: str) -> None:
    """One clear error unless ``a`` and ``b`` hold the same tensors with the same shapes."""
    only = sorted(set(a.weights) ^ set(b.weights))
    if only:
        where = a.source if only[0] in a.weights else b.source
        raise UserError(
            f"pair {label}: {a.source} and {b.source} are not the same model ({only[0]} is only in {where})"
        )
    for name, value in a.weights.items():
        if value.shape != b.weights[name].shape:
            raise UserError(
                f"pair {label}: {a.source} and {b.source} are not the same model ({name} is "
                f"{'x'.join(map(str, value.shape))} in one, {'x'.join(map(str, b.weights[name].shape))} in the other)"
            )


def update_spectra(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Per linear layer of the transformer blocks, the singular values (descending, float64, CPU) of
    ``b[name] - a[name]`` (the difference taken in float64, so fp32 weights subtract exactly)."""
    spectra = {}
    for name, weight_a in a.items():
        if layer_type(name, weight_a) is None:
            continue
        delta = b[name].to(device=device, dtype=torch.float64) - weight_a.to(device=device, dtype=torch.float64)
        spectra[name] = torch.linalg.svdvals(delta).cpu()
    return spectra


def summarize(
    spectra: Mapping[str, torch.Tensor], *, shapes: Mapping[str, Sequence[int]], threshold: float
) -> dict[str, dict[str, Any]]:
    """Per layer type (ordered q, k, v, o, gate, up, down, then any other): its matrix shape, its layers, the number
    of singular values above ``threshold`` per layer (and their mean, min, max and the mean's share of full rank)
    and the spectrum averaged over its layers. A type whose layers differ in shape is split by shape
    (``name[MxN]``)."""
    by_type: dict[str, list[str]] = {}
    for name in spectra:
        by_type.setdefault(name.split(".")[-2], []).append(name)
    groups: dict[str, list[str]] = {}
    for kind in type_order(list(by_type)):
        names = by_type[kind]
        distinct = sorted({tuple(shapes[n]) for n in names})
        for shape in distinct:
            key = kind if len(distinct) == 1 else f"{kind}[{shape[0]}x{shape[1]}]"
            groups[key] = [n for n in names if tuple(shapes[n]) == shape]
    out: dict[str, dict[str, Any]] = {}
    for key, names in groups.items():
        values = torch.stack([spectra[n] for n in names])
        counts = [int(c) for c in (values > threshold).sum(dim=1)]
        full_rank = values.shape[1]
        mean = sum(counts) / len(counts)
        out[key] = {
            "shape": list(shapes[names[0]]),
            "layers": names,
            "full_rank": full_rank,
            "counts": counts,
            "count_mean": mean,
            "count_min": min(counts),
            "count_max": max(counts),
            "share_of_full_rank": mean / full_rank,
            "mean_spectrum": values.mean(dim=0).tolist(),
        }
    return out


def type_order(types: Sequence[str]) -> list[str]:
    """The layer types in the order of a LLaMA block, then any other alphabetically."""
    known = [t for t in LAYER_ORDER if t in types]
    return known + sorted(t for t in types if t not in LAYER_ORDER)


# -- the study ---------------------------------------------------------------------------------------------------


def analyze_rank(
    pairs: Sequence[RankPair],
    *,
    output: str | Path,
    threshold: float = 0.1,
    init_device: str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    """Analyse the update of every pair and write ``rank_spectra.png``, ``rank_counts.png``, ``rank.json`` and
    ``rank.md`` into ``output``; returns the report (``rank.json``'s content). ``device``: where the SVDs run."""
    if not pairs:
        raise UserError("give a pair of checkpoints: CKPT_A CKPT_B, or --pair LABEL CKPT_A CKPT_B")
    labels = [pair.label for pair in pairs]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise UserError(f"two pairs are labelled {duplicated[0]!r}; give each pair its own label")
    if not (math.isfinite(threshold) and threshold > 0):
        raise UserError(f"--threshold must be a positive number; got {threshold}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use cpu")
    check_output(output)
    require_matplotlib()
    report: dict[str, Any] = {"threshold": threshold, "pairs": []}
    for pair in pairs:
        a = load_dense(pair.a, init_device=init_device)
        b = load_dense(pair.b, init_device=init_device)
        check_same_model(a, b, label=pair.label)
        spectra = update_spectra(a.weights, b.weights, device=device)
        if not spectra:
            raise UserError(f"pair {pair.label}: {b.source} holds no linear layer of a transformer block")
        shapes = {name: list(a.weights[name].shape) for name in spectra}
        report["pairs"].append(
            {
                "label": pair.label,
                "a": {"source": a.source, "step": a.step, "method": a.method},
                "b": {"source": b.source, "step": b.step, "method": b.method},
                "types": summarize(spectra, shapes=shapes, threshold=threshold),
            }
        )
        del a, b, spectra  # one pair's weights in memory at a time
    out = prepare_output(output)
    (out / "rank.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "rank.md").write_text(rank_markdown(report))
    _draw_spectra(report, path=out / "rank_spectra.png")
    _draw_counts(report, path=out / "rank_counts.png")
    return report


def rank_markdown(report: Mapping[str, Any]) -> str:
    """The table of ``rank.md``: a row per pair and layer type."""
    t = report["threshold"]
    lines = [
        "# Rank of the weight updates",
        "",
        f"Singular values of dW = W_B - W_A per linear layer of the transformer blocks (adapters merged); "
        f'"above" counts those greater than {t:g} (ReLoRA, Figures 3 and 4).',
        "",
    ]
    for pair in report["pairs"]:
        ends = [
            f"{side['source']}" + (f" (step {side['step']})" if side["step"] is not None else "")
            for side in (pair["a"], pair["b"])
        ]
        lines.append(f"- **{pair['label']}**: A = {ends[0]}, B = {ends[1]}")
    lines += [
        "",
        f"| pair | layer type | shape | layers | above {t:g}: mean | min | max | full rank | share of full rank |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in report["pairs"]:
        for kind, s in pair["types"].items():
            lines.append(
                f"| {pair['label']} | {kind} | {s['shape'][0]}x{s['shape'][1]} | {len(s['layers'])} | "
                f"{s['count_mean']:.1f} | {s['count_min']} | {s['count_max']} | {s['full_rank']} | "
                f"{100 * s['share_of_full_rank']:.1f}% |"
            )
    return "\n".join(lines) + "\n"


def _all_types(report: Mapping[str, Any]) -> list[str]:
    seen: list[str] = []
    for pair in report["pairs"]:
        seen += [kind for kind in pair["types"] if kind not in seen]
    return seen


def _draw_spectra(report: Mapping[str, Any], *, path: Path) -> None:
    """Figure 3: per layer type, the singular values (descending) averaged over its layers, a line per pair."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    types = _all_types(report)
    ncols = min(len(types), 4)
    nrows = math.ceil(len(types) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    threshold = report["threshold"]
    for ax, kind in zip(axes, types):
        positive = False
        for i, pair in enumerate(report["pairs"]):
            if kind not in pair["types"]:
                continue
            spectrum = pair["types"][kind]["mean_spectrum"]
            # A zero singular value has no place on a log axis: it is left out (the count shows it).
            values = [v if v > 0 else math.nan for v in spectrum]
            positive = positive or any(v > 0 for v in spectrum)
            ax.plot(range(1, len(values) + 1), values, color=f"C{i % 10}", linewidth=1.4)
        ax.axhline(threshold, color="0.4", linestyle="--", linewidth=0.9)
        if positive:
            ax.set_yscale("log")
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("index (descending)")
        ax.set_ylabel("singular value")
        ax.grid(alpha=0.3)
    for ax in axes[len(types) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=f"C{i % 10}", label=p["label"]) for i, p in enumerate(report["pairs"])]
    handles.append(Line2D([], [], color="0.4", linestyle="--", label=f"threshold {threshold:g}"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5), frameon=False)
    fig.savefig(path, dpi=110)


def _draw_counts(report: Mapping[str, Any], *, path: Path) -> None:
    """Figure 4: per layer type, the number of singular values above the threshold (mean over its layers, the
    whiskers min and max), a bar per pair; a black tick marks full rank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    types = _all_types(report)
    pairs = report["pairs"]
    fig = Figure(figsize=(max(6.0, 1.0 + len(types) * (0.4 + 0.25 * len(pairs))), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(pairs)
    for i, pair in enumerate(pairs):
        xs, heights, low, high, full = [], [], [], [], []
        for j, kind in enumerate(types):
            if kind not in pair["types"]:
                continue
            s = pair["types"][kind]
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(s["count_mean"])
            low.append(s["count_mean"] - s["count_min"])
            high.append(s["count_max"] - s["count_mean"])
            full.append(s["full_rank"])
        ax.bar(xs, heights, width=width * 0.92, color=f"C{i % 10}", yerr=[low, high], capsize=2, ecolor="0.3")
        ax.scatter(xs, full, marker="_", color="black", s=max(40.0, 300 * width), zorder=3)
    ax.set_xticks(range(len(types)), types, rotation=20)
    ax.set_ylabel(f"singular values > {report['threshold']:g}")
    ax.grid(axis="y", alpha=0.3)
    handles: list[Any] = [Patch(color=f"C{i % 10}", label=p["label"]) for i, p in enumerate(pairs)]
    handles.append(Line2D([], [], color="black", marker="_", linestyle="none", markersize=12, label="full rank"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5), frameon=False)
    fig.savefig(path, dpi=110)
