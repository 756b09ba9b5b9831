"""Optimizer benchmarks for the GaLore family and per-layer updates (``tools/bench.py --suite optim``).

Each measurement is a ratio against a baseline taken in the same process (or, for peak memory, in fresh
processes launched by the same script), because these machines are noisy:

* ``state_bytes``: optimizer-state bytes (moments, projectors, everything in ``optimizer.state``) of GaLore-AdamW
  after one step on the shapes of a named model, against torch's AdamW on the same parameters;
* ``step_time``: one optimizer step (no projector refresh) of our GaLore-AdamW against galore-torch's
  ``GaLoreAdamW`` and torch's AdamW on the matrices of ``blocks`` transformer blocks, timings interleaved;
* ``refresh``: computing the rank-``r`` projectors of those matrices from real gradients (a freshly initialised
  model on built-in text) by full SVD and by the randomized range finder, with the gradient energy each captures;
* ``overhead``: a whole training step of the ``60m`` model with ``galore`` against ``full`` (projector refresh
  amortised over the gap);
* ``per_layer_memory``: peak resident memory of a few training steps with and without per-layer updates;
* ``family``: the whole optimizer of ``full`` (AdamW), ``galore``, ``apollo``, ``apollo_mini``, ``fira``, ``muon``,
  ``normuon`` and ``dion`` on the parameters of a named model, built through the methods as training builds them:
  optimizer-state bytes and the median step time between refreshes (interleaved rounds), each against AdamW and
  GaLore, the refresh step, and the Muon family's orthogonalisation per step against one GaLore refresh;
* ``newton_schulz``: Newton-Schulz in bf16 against fp32 on a model's block shapes (accuracy and time).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_pept.config import MethodConfig, ModelConfig, OptimConfig
from megatron_pept.methods import build_method
from megatron_pept.models import build_model, llama_args
from megatron_pept.optim.galore import GaLoreAdamW, GaLoreOptimizer
from megatron_pept.optim.projector import captured_energy, projection_side, randomized_basis, svd_basis


@dataclass(frozen=True)
class OptimBenchSettings:
    model: str = "350m"
    rank: int = 256
    blocks: int = 2
    rounds: int = 7
    vocab_size: int = 32000


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    """Bytes of the tensors in ``optimizer.state``, of every parameter or of ``params`` only."""
    states = optimizer.state.values() if params is None else (optimizer.state[p] for p in params)
    return sum(v.numel() * v.element_size() for s in states for v in s.values() if torch.is_tensor(v))


def _materialised(model_name: str, *, vocab_size: int, seed: int = 0, max_seq_len: int = 256) -> torch.nn.Module:
    model = build_model(llama_args(ModelConfig(name=model_name), vocab_size=vocab_size, max_seq_len=max_seq_len))
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


def bench_state_bytes(s: OptimBenchSettings) -> dict[str, Any]:
    """GaLore vs AdamW optimizer-state bytes after one step with random gradients."""
    model = _materialised(s.model, vocab_size=s.vocab_size)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adamw.step()
    out: dict[str, Any] = {"adamw_bytes": state_bytes(adamw)}
    del adamw
    for label, targets in (
        ("galore", None),
        (
            "galore_with_lm_head",
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        ),
    ):
        cfg = MethodConfig(name="galore", rank=s.rank, **({"target_modules": targets} if targets else {}))
        opt = build_method(cfg, optim_cfg=OptimConfig(), total_steps=10).build_optimizer(model)
        opt.step()
        out[f"{label}_bytes"] = state_bytes(opt)
        out[f"{label}_ratio"] = out[f"{label}_bytes"] / out["adamw_bytes"]
        # The same, counting only the projected matrices on both sides.
        projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
        ours = state_bytes(opt, projected)
        full = sum(2 * p.numel() * 4 for p in projected)
        out[f"{label}_matrices_ratio"] = ours / full
        del opt
    return out


def _block_matrices(s: OptimBenchSettings) -> list[torch.nn.Parameter]:
    args = llama_args(ModelConfig(name=s.model), vocab_size=s.vocab_size)
    h, kv, ff = args.hidden_size, args.num_kv_heads * args.head_dim, args.intermediate_size
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)] * s.blocks
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in shapes]


def bench_step_time(s: OptimBenchSettings) -> dict[str, Any]:
    """Median step time (after the initial refresh) of ours vs galore-torch vs AdamW on the same matrices."""
    galore_torch = _import_galore_torch()
    params = {name: _block_matrices(s) for name in ("ours", "galore_torch", "adamw")}
    group = dict(rank=s.rank, update_proj_gap=10**9, scale=0.25, proj_type="std")
    optimizers = {
        "ours": GaLoreAdamW([{"params": params["ours"], **group}], lr=1e-3, eps=1e-6),
        "galore_torch": galore_torch.GaLoreAdamW(
            [{"params": params["galore_torch"], **group}], lr=1e-3, eps=1e-6, no_deprecation_warning=True
        ),
        "adamw": torch.optim.AdamW(params["adamw"], lr=1e-3),
    }
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params["ours"]]

    def step(name: str) -> float:
        for p, g in zip(params[name], grads):
            p.grad = g.clone()
        start = time.perf_counter()
        optimizers[name].step()
        return time.perf_counter() - start

    for name in optimizers:  # first step: projectors are computed here, not timed
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(s.rounds):
        order = list(optimizers) if r % 2 == 0 else list(reversed(optimizers))
        for name in order:
            times[name].append(step(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "median_seconds": med,
        "ours_vs_galore_torch": med["ours"] / med["galore_torch"],
        "ours_vs_adamw": med["ours"] / med["adamw"],
        "galore_torch_vs_adamw": med["galore_torch"] / med["adamw"],
    }


def _real_gradients(s: OptimBenchSettings) -> list[torch.Tensor]:
    """Gradients of the first ``blocks`` blocks' matrices of a freshly initialised model on built-in text."""
    from megatron_pept.data.corpus import generate_stories

    model = _materialised(s.model, vocab_size=s.vocab_size)
    text = " ".join(generate_stories(64, seed=0)).encode()
    ids = torch.tensor(list(text[: 4 * 129]), dtype=torch.long).view(4, 129) % s.vocab_size
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = []
    for i in range(s.blocks):
        layer = model.model.layers[str(i)]
        for mod in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ):
            grads.append(mod.weight.grad.clone())
    return grads


def bench_refresh(s: OptimBenchSettings) -> dict[str, Any]:
    grads = _real_gradients(s)
    full_t, rand_t, e_full, e_rand = [], [], 0.0, 0.0
    total = sum(float(g.square().sum()) for g in grads)
    for _ in range(s.rounds):
        t_full = t_rand = 0.0
        ef = er = 0.0
        for i, g in enumerate(grads):
            side = projection_side(g.shape)
            start = time.perf_counter()
            exact = svd_basis(g, rank=s.rank, side=side)
            t_full += time.perf_counter() - start
            start = time.perf_counter()
            approx = randomized_basis(g, rank=s.rank, side=side, generator=torch.Generator().manual_seed(i))
            t_rand += time.perf_counter() - start
            sq = float(g.square().sum())
            ef += captured_energy(g, exact, side=side) * sq
            er += captured_energy(g, approx, side=side) * sq
        full_t.append(t_full)
        rand_t.append(t_rand)
        e_full, e_rand = ef / total, er / total
    med_full, med_rand = statistics.median(full_t), statistics.median(rand_t)
    return {
        "full_svd_seconds": med_full,
        "randomized_seconds": med_rand,
        "speedup": med_full / med_rand,
        "energy_full": e_full,
        "energy_randomized": e_rand,
        "energy_relative_gap": (e_full - e_rand) / e_full,
    }


def bench_overhead(s: OptimBenchSettings, *, gap: int = 200) -> dict[str, Any]:
    """Training step of the 60m model: full vs galore between refreshes, plus a refresh amortised over ``gap``."""
    from megatron_pept.models.loss import cross_entropy_loss

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (8, 257), generator=gen)
    runs = {}
    for name in ("full", "galore"):
        model = _materialised("60m", vocab_size=1024)
        method = build_method(
            MethodConfig(name=name, rank=128, update_proj_gap=gap), optim_cfg=OptimConfig(), total_steps=10**6
        )
        runs[name] = (model, method.build_optimizer(model))

    def train_step(name: str) -> tuple[float, float]:
        model, opt = runs[name]
        start = time.perf_counter()
        cross_entropy_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return end - start, getattr(opt, "last_svd_seconds", 0.0)

    refresh_seconds = train_step("galore")[1]  # step 0 computes every projector
    train_step("full")
    times: dict[str, list[float]] = {"full": [], "galore": []}
    for r in range(s.rounds):
        for name in ("full", "galore") if r % 2 == 0 else ("galore", "full"):
            times[name].append(train_step(name)[0])
    full_t, galore_t = statistics.median(times["full"]), statistics.median(times["galore"])
    amortised = galore_t + refresh_seconds / gap
    return {
        "full_step_seconds": full_t,
        "galore_step_seconds": galore_t,
        "refresh_seconds": refresh_seconds,
        "gap": gap,
        "overhead": amortised / full_t - 1.0,
    }


_MEMORY_SCRIPT = r"""
import json, sys
try:  # the peak RSS a forked child inherits from a big parent: reset it (Linux)
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
import torch
from megatron_pept.config import MethodConfig, ModelConfig, OptimConfig
from megatron_pept.methods import build_method
from megatron_pept.models import build_model, llama_args
from megatron_pept.optim.per_layer import PerLayerOptimizer
from megatron_pept.models.loss import cross_entropy_loss
model_name, method_name, per_layer = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = build_model(llama_args(ModelConfig(name=model_name), vocab_size=1024, max_seq_len=128))
model.to_empty(device="cpu"); model.init_weights(seed=0)
method = build_method(MethodConfig(name=method_name, rank=128), optim_cfg=OptimConfig(), total_steps=10)
opt = method.build_optimizer(model)
if per_layer:
    opt = PerLayerOptimizer(opt)
ids = torch.randint(0, 1024, (2, 129), generator=torch.Generator().manual_seed(0))
for _ in range(3):
    if per_layer:
        opt.arm()
    cross_entropy_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    if per_layer:
        opt.disarm()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"peak_rss_bytes": int(hwm) * 1024}))
"""


def bench_per_layer_memory(s: OptimBenchSettings, *, model: str = "130m") -> dict[str, Any]:
    out: dict[str, Any] = {"model": model}
    for method in ("full", "galore"):
        for per_layer in (False, True):
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_SCRIPT, model, method, "1" if per_layer else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
            out[f"{method}_{'per_layer' if per_layer else 'global'}_peak_gb"] = peak / 1e9
        out[f"{method}_ratio"] = out[f"{method}_per_layer_peak_gb"] / out[f"{method}_global_peak_gb"]
    return out


FAMILY = ("full", "galore", "apollo", "apollo_mini", "fira", "muon", "normuon", "dion")
"""The optimizers of ``bench_family``, by method name. The Muon family's are measured as configured by
:data:`FAMILY_SETTINGS`."""
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    # Newton-Schulz in fp32: on a CPU without bf16 matrix units (this project's benchmark VM) bf16 matmuls are
    # emulated, about 10x slower than fp32, which would measure the emulation, not Muon
    "muon": {"ns_dtype": "fp32"},
    "normuon": {"ns_dtype": "fp32"},
    "dion": {"rank_fraction": 0.25},
}


def bench_family(s: OptimBenchSettings) -> dict[str, Any]:
    """State bytes and step time of the GaLore family's and the Muon family's optimizers on one model's parameters,
    same gradients. GaLore's first step computes its projectors (an SVD of every matrix): ``refresh_seconds``, its
    first step less its median, is the cost of one refresh, beside which the Muon family's per-step
    orthogonalisation (``step_seconds`` less AdamW's) is reported as ``ortho_vs_galore_refresh``."""
    model = _materialised(s.model, vocab_size=s.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizers = {}
    for name in FAMILY:
        # the first step draws or computes every projector; the timed ones refresh none
        keys: dict[str, Any] = {} if name in ("full", *FAMILY_SETTINGS) else {"update_proj_gap": 10**9}
        if name in ("galore", "apollo", "fira"):  # apollo_mini's rank is 1 by definition
            keys["rank"] = s.rank
        keys.update(FAMILY_SETTINGS.get(name, {}))
        cfg = MethodConfig(name=name, **keys)
        optimizers[name] = build_method(cfg, optim_cfg=OptimConfig(), total_steps=10**6).build_optimizer(model)

    def step(name: str) -> float:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        optimizers[name].step()
        return time.perf_counter() - start

    first = {name: step(name) for name in FAMILY}  # state allocated, projectors computed (SVD) or drawn (seed)
    times: dict[str, list[float]] = {name: [] for name in FAMILY}
    for r in range(s.rounds):
        for name in FAMILY if r % 2 == 0 else tuple(reversed(FAMILY)):
            times[name].append(step(name))
    out: dict[str, Any] = {"model": s.model, "rank": s.rank, "weight_bytes": weight_bytes}
    out["settings"] = {name: FAMILY_SETTINGS.get(name, {}) for name in FAMILY}
    med = {name: statistics.median(t) for name, t in times.items()}
    total = {name: state_bytes(opt) for name, opt in optimizers.items()}
    refresh = first["galore"] - med["galore"]
    for name in FAMILY:
        opt, nbytes = optimizers[name], total[name]
        projected = [
            p for g in opt.param_groups if "rank" in g or g.get("algorithm", "adamw") != "adamw" for p in g["params"]
        ]
        out[name] = {
            "state_bytes": nbytes,
            # the projected (orthogonalised) matrices' share, the rest being full Adam moments of the others
            "projected_state_bytes": state_bytes(opt, projected),
            "projected_weight_bytes": sum(p.numel() * p.element_size() for p in projected),
            # APOLLO's random projectors live outside the state (redrawn from seeds): memory all the same
            "held_projector_bytes": opt.held_projector_bytes() if isinstance(opt, GaLoreOptimizer) else 0,
            "state_vs_weights": nbytes / weight_bytes,
            "state_vs_adamw": nbytes / total["full"],
            "state_vs_galore": nbytes / total["galore"],
            "step_seconds": med[name],
            "step_vs_adamw": med[name] / med["full"],
            "step_vs_galore": med[name] / med["galore"],
            "first_step_seconds": first[name],
        }
        if name in FAMILY_SETTINGS:  # the orthogonalisation each step costs, against one GaLore refresh
            out[name]["ortho_vs_galore_refresh"] = (med[name] - med["full"]) / refresh if refresh > 0 else None
    out["galore_refresh_seconds"] = refresh
    return out


def bench_newton_schulz(s: OptimBenchSettings) -> dict[str, Any]:
    """Newton-Schulz in bf16 (torch.optim.Muon's) against fp32 (``method.ns_dtype=fp32``) on the shapes of a named
    model's block matrices: the distance of each result from the fp64 iteration's (relative, Frobenius) and the
    spread of its singular values, and the time of each (interleaved rounds). The time ratio is a property of the
    hardware: on a GPU bf16 runs on tensor cores; on a CPU without bf16 matrix units it is emulated."""
    from megatron_pept.optim.muon import newton_schulz

    model = _materialised(s.model, vocab_size=s.vocab_size)
    block = (
        next(iter(model.model.layers.values()))
        if isinstance(model.model.layers, torch.nn.ModuleDict)
        else model.model.layers[0]
    )
    shapes = sorted({tuple(m.weight.shape) for m in block.modules() if isinstance(m, torch.nn.Linear)})
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"model": s.model, "shapes": {}}
    for shape in shapes:
        g = torch.randn(shape, generator=gen)
        exact = newton_schulz(g.double(), dtype=torch.float64)
        row: dict[str, Any] = {}
        times: dict[str, list[float]] = {"bf16": [], "fp32": []}
        for r in range(max(1, s.rounds)):
            for name in ("bf16", "fp32") if r % 2 == 0 else ("fp32", "bf16"):
                dtype = torch.bfloat16 if name == "bf16" else torch.float32
                start = time.perf_counter()
                result = newton_schulz(g, dtype=dtype)
                times[name].append(time.perf_counter() - start)
                if r == 0:
                    sv = torch.linalg.svdvals(result.double())
                    row[name] = {
                        "error_vs_fp64": float((result.double() - exact).norm() / exact.norm()),
                        "singular_min": float(sv.min()),
                        "singular_max": float(sv.max()),
                    }
        for name in times:
            row[name]["seconds"] = statistics.median(times[name])
        row["bf16_time_vs_fp32"] = row["bf16"]["seconds"] / row["fp32"]["seconds"]
        out["shapes"]["x".join(map(str, shape))] = row
    return out


def _import_galore_torch() -> Any:
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import galore_torch
    except ImportError:
        raise ImportError("the step-time benchmark compares with galore-torch: pip install galore-torch") from None
    return galore_torch


BENCHES = {
    "state_bytes": bench_state_bytes,
    "step_time": bench_step_time,
    "refresh": bench_refresh,
    "overhead": bench_overhead,
    "per_layer_memory": bench_per_layer_memory,
    "family": bench_family,
    "newton_schulz": bench_newton_schulz,
}


def run_optim_benchmarks(settings: OptimBenchSettings, *, which: list[str]) -> dict[str, Any]:
    return {name: BENCHES[name](settings) for name in which}
