"""No host synchronisation and no per-call host-to-device copy in the optimizer step (issue 27, item 4).

A step of every registered method (global steps, and per-layer updates, whose steps run inside backward) runs under
:func:`sync_guard.no_host_sync`: the optimizer's step, the method's ``on_step_end`` and the writing of its scalars may
read no tensor's value on the host and copy no host data to the device. Method statistics stay tensors until the
logging step (``train.log_interval``), where they must equal what the host arithmetic that made them before they
were tensors gives (that arithmetic is restated here, applied to the same step's optimizer statistics).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sync_guard import HostSyncError, no_host_sync
from test_trainer import tiny
from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

from megatron_pept.checkpoint.state import optimizer_destinations
from megatron_pept.methods import METHODS
from megatron_pept.methods.relora import lowrank_layers
from megatron_pept.metrics import MetricsWriter
from megatron_pept.optim import HOST_STATE_KEYS
from megatron_pept.optim.galore import GaLoreAdamW, GaLoreAdamW8bit
from megatron_pept.optim.per_layer import PerLayerOptimizer
from megatron_pept.optim.projector import projection_side, subspace_overlap
from megatron_pept.sharding import optimizer_protocol
from megatron_pept.trainer import Trainer

# Step 0 (0-based) makes the optimizer state and GaLore's first projectors; steps 1 and 2 are guarded; 2 and 4 steps
# done are logging steps.
STEPS, LOG_INTERVAL = 4, 2
GUARDED = {1, 2}
LOWRANK = ("lora", "relora", "redora", "repissa", "reloqra")
MUON = ("muon", "normuon", "dion")
# Settings a method needs on the debug model (64 wide, MLP 176): q_galore's quantisation groups must divide its rows
# and projectors.
METHOD_EXTRA = {"q_galore": ["method.weight_group_size=16", "method.proj_group_size=32"]}
NO_PER_LAYER: set[str] = set()  # every method steps per layer on one process (q_galore: from its int8 layers' backward)


def host_counters(optimizer) -> list[torch.Tensor]:
    """The optimizer's host counters (``step``, ``refreshes``, ``seed``): host tensors by design, read for free."""
    return [v for s in optimizer.state.values() for k, v in s.items() if k in HOST_STATE_KEYS]


def steppers(optimizer) -> list:
    """What updates the parameters: the optimizer, or under per-layer updates its per-parameter optimizers (stepped
    inside backward hooks)."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, PerLayerOptimizer) else [optimizer]


class GuardedRun:
    """Trains ``trainer`` with its optimizer steps, ``on_step_end`` and scalar writes under the guard on the steps in
    ``guarded`` (0-based); records every scalar TensorBoard receives (with the steps done when it was written), each
    step's optimizer statistics and the projectors before and after each step."""

    def __init__(self, trainer: Trainer, *, guarded: set[int]) -> None:
        self.trainer, self.guarded = trainer, guarded
        self.written: list[tuple[str, int, object, int]] = []  # tag, step, value, steps done when written
        self.stats: dict[int, dict] = {}  # steps done -> the optimizer's step_stats() of that step
        self.projectors: dict[int, tuple[dict, dict]] = {}  # steps done -> projectors before and after it
        self.violations: list[str] = []
        for stepper in steppers(trainer.optimizer):
            stepper.step = self._guard(stepper.step)
        method_end, step_body = trainer.method.on_step_end, trainer.train_step

        def on_step_end(**kw):
            end = self._guard(method_end)(**kw)
            done = trainer.state.step + 1  # the step TensorBoard files this one under
            self.stats[done] = optimizer_protocol(kw["optimizer"]).step_stats()
            self.projectors[done] = (self._before, self._projectors())
            return end

        def train_step():
            self._before = self._projectors()
            return step_body()

        trainer.method.on_step_end, trainer.train_step = on_step_end, train_step
        trainer.writer.scalars = self._guard(trainer.writer.scalars)
        tb = trainer.writer._writer
        add_scalar = tb.add_scalar

        def record(tag, value, global_step=None, **kw):
            self.written.append((tag, global_step, value, trainer.state.step))
            return add_scalar(tag, value, global_step=global_step, **kw)

        tb.add_scalar = record

    def _projectors(self) -> dict:
        return {p: s["projector"].clone() for p, s in self.trainer.optimizer.state.items() if "projector" in s}

    def _guard(self, fn):
        def guarded(*args, **kwargs):
            if self.trainer.state.step not in self.guarded:
                return fn(*args, **kwargs)
            with no_host_sync(host_tensors=lambda: host_counters(self.trainer.optimizer)) as seen:
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.violations.extend(seen)

        return guarded

    def method_scalars(self) -> dict[int, dict[str, object]]:
        out: dict[int, dict[str, object]] = {}
        for tag, step, value, _ in self.written:
            if tag.split("/")[0] in ("galore", "relora", "muon"):
                out.setdefault(step, {})[tag] = value
        return out


def run(data: Path, run_dir: Path, method: str, *extra: str, guarded: set[int] = GUARDED) -> GuardedRun:
    cfg = tiny(
        data,
        run_dir,
        f"method.name={method}",
        *(["method.rank=4"] if "rank" in METHODS[method].config_keys else []),
        *METHOD_EXTRA.get(method, []),
        f"train.steps={STEPS}",
        f"train.log_interval={LOG_INTERVAL}",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "metrics.tensorboard=true",
        *extra,
    )
    trainer = Trainer(cfg)
    guarded_run = GuardedRun(trainer, guarded=guarded)
    with trainer:
        trainer.train()
    return guarded_run


VARIANTS = [(name, per_layer) for name in METHODS for per_layer in (False, True)]


@pytest.mark.parametrize("name,per_layer", VARIANTS, ids=[f"{n}-{'per_layer' if p else 'global'}" for n, p in VARIANTS])
def test_no_host_sync_in_the_step_of_any_method(name: str, per_layer: bool, quickstart_data: Path, tmp_path: Path):
    if per_layer and name in NO_PER_LAYER:
        pytest.skip(f"{name} refuses optim.per_layer=true at validation")
    r = run(quickstart_data, tmp_path, name, f"optim.per_layer={str(per_layer).lower()}")
    assert not r.violations, r.violations  # also any that some code caught
    scalars = r.method_scalars()
    if name in ("full", "adam_mini"):
        assert not scalars
        return
    # Every step's statistics reached TensorBoard, as floats, the same tags each step; those kept as tensors were
    # read at the logging step, not before.
    assert sorted(scalars) == list(range(1, STEPS + 1))
    assert all(type(v) is float for step in scalars.values() for v in step.values())
    assert len({frozenset(s) for s in scalars.values()}) == 1
    deferred = {
        "relora/adapter_norm",
        "galore/ef_residual_norm",
        "galore/scaling_factor",
        "galore/limited_fraction",
        "muon/update_rms",
    }
    read_at = {(step, done) for tag, step, _, done in r.written if tag in deferred}
    if name not in ("galore", "galore_dynamic", "galore_8bit", "galore_adafactor", "q_galore"):  # these have none
        assert read_at == {(1, 2), (2, 2), (3, 4), (4, 4)}  # each step's at the next logging step
    check_statistics(r, name, per_layer)


def check_statistics(r: GuardedRun, name: str, per_layer: bool) -> None:
    """The logged statistics equal the host arithmetic that made them before they were tensors (the method's
    ``on_step_end`` as it was, applied to each step's optimizer statistics) and, where the state determines them, an
    independent computation from the state."""
    scalars, trainer = r.method_scalars(), r.trainer
    if name in MUON:
        check_muon_statistics(r, name, per_layer)
        return
    if name in LOWRANK:
        with torch.no_grad():
            layers = lowrank_layers(trainer.raw_model)
            norms = [p.float().norm() for _, layer in layers for p in layer.adapter_parameters()]
            assert scalars[STEPS]["relora/adapter_norm"] == float(torch.linalg.vector_norm(torch.stack(norms)))
        return
    activations = 0
    for done in range(1, STEPS + 1):
        stats, logged = r.stats[done], scalars[done]
        if stats["overlaps"]:
            overlaps = [float(o) for o in stats["overlaps"]]
            assert logged["galore/subspace_overlap"] == sum(overlaps) / len(overlaps)
        if METHODS[name].error_feedback:
            # Python's x ** 0.5 and a correctly rounded square root may differ in the last bit
            expected = float(stats["ef_residual_sq"]) ** 0.5
            assert logged["galore/ef_residual_norm"] == pytest.approx(expected, rel=2**-52)
        if stats["scaled_matrices"]:
            limited = int(stats["limited_matrices"])
            activations += limited
            assert logged["galore/scaling_factor"] == float(stats["scaling_factor_sum"]) / stats["scaled_matrices"]
            assert logged["galore/limited_fraction"] == limited / stats["scaled_matrices"]
            assert logged["galore/limiter_activations"] == float(activations)
    if METHODS[name].error_feedback:
        # The residual kept in the state is the last step's: its squares summed over the matrices in step order.
        stepped = trainer.optimizer._last_stepped if per_layer else [trainer.optimizer]
        total = 0.0
        for opt in stepped:
            for group in opt.param_groups:
                for p in group["params"]:
                    if "ef_residual" in opt.state.get(p, {}):
                        total += float(opt.state[p]["ef_residual"].square().sum())
        assert float(r.stats[STEPS]["ef_residual_sq"]) == total > 0
        assert scalars[STEPS]["galore/ef_residual_norm"] == pytest.approx(math.sqrt(total), rel=2**-52)


def check_muon_statistics(r: GuardedRun, name: str, per_layer: bool) -> None:
    """The Muon family's scalars equal the host arithmetic of each step's statistics; the update RMS per unit of
    learning rate is that of match_rms_adamw (0.2) for every method, and Dion's residual norm is that of the rank-r
    power iteration recomputed on the host (a test of its own, test_muon.py, checks it against its definition)."""
    for done in range(1, STEPS + 1):
        stats, logged = r.stats[done], r.method_scalars()[done]
        assert stats["matrices"] == 14  # the debug model's projections
        assert logged["muon/update_rms"] == float((stats["update_ms_sum"] / stats["matrices"]).sqrt())
        assert logged["muon/update_rms"] == pytest.approx(0.2, rel=0.15)
        assert logged["muon/orthogonalize_seconds"] == stats["ortho_seconds"] > 0
        if name == "dion":
            assert logged["muon/residual_norm"] == pytest.approx(float(stats["dion_residual_sq"]) ** 0.5, rel=2**-52)
            assert logged["muon/residual_norm"] > 0
        else:
            assert "muon/residual_norm" not in logged


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_a_refresh_logs_the_overlap_of_the_old_and_new_projectors(per_layer: bool, quickstart_data: Path, tmp_path):
    """A refresh (every update_proj_gap steps) logs the mean subspace overlap of the old and the new projectors, as
    computed from them on the host; the overlap itself is kept on the device (on a GPU the SVD synchronises)."""
    pl = f"optim.per_layer={str(per_layer).lower()}"
    r = run(quickstart_data, tmp_path, "galore", "method.update_proj_gap=2", pl)  # refreshes at 0 and 2
    assert not r.violations, r.violations
    before, after = r.projectors[3]  # the step with index 2 refreshed: 3 steps done
    overlaps = [subspace_overlap(before[p], after[p], side=projection_side(p.shape)) for p in after]
    assert len(overlaps) == 14  # the debug model's projected matrices
    assert r.method_scalars()[3]["galore/subspace_overlap"] == pytest.approx(sum(overlaps) / len(overlaps), rel=1e-12)
    assert "galore/subspace_overlap" not in r.method_scalars()[2]


def test_the_writer_reads_device_scalars_only_when_synced(tmp_path: Path) -> None:
    """Tensors are kept with their steps (no read in scalars()) and written in order by one sync; a float of a tag
    with kept tensors waits behind them."""
    writer = MetricsWriter(tmp_path, enabled=True)
    written = []
    writer._writer.add_scalar = lambda tag, value, global_step=None: written.append((tag, global_step, value))
    x, z = torch.tensor(0.5), torch.tensor(3, dtype=torch.int64)
    with no_host_sync():
        writer.scalars(1, {"a/x": x, "a/y": 2.0})
        writer.scalars(2, {"a/x": 1.5, "a/z": z})
    assert written == [("a/y", 1, 2.0)]
    writer.sync()
    assert written == [("a/y", 1, 2.0), ("a/x", 1, 0.5), ("a/x", 2, 1.5), ("a/z", 2, 3.0)]
    assert all(type(v) is float for _, _, v in written)
    writer.scalars(3, {"a/x": torch.tensor(4.0)})
    writer.close()  # close reads what is left
    assert written[-1] == ("a/x", 3, 4.0)


# -- the 8-bit code tables ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_the_8bit_code_tables_are_made_once_per_device(per_layer: bool, quickstart_data: Path, tmp_path: Path):
    """Every quantisation and dequantisation of every step (and of every per-layer optimizer) gets the same two
    table objects, on the parameters' device: moved there once, not copied from the host on each call."""
    pytest.importorskip("bitsandbytes")
    pl = f"optim.per_layer={str(per_layer).lower()}"
    trainer = Trainer(tiny(quickstart_data, tmp_path, "method.name=galore_8bit", "method.rank=4", "train.steps=3", pl))
    calls: list[tuple[int, torch.device]] = []

    class Spy:  # bitsandbytes.functional, recording the code table of each (de)quantisation
        def __init__(self, bnbf) -> None:
            self.bnbf = bnbf

        def __getattr__(self, name):
            fn = getattr(self.bnbf, name)

            def spied(*args, code, **kwargs):
                calls.append((id(code), code.device))
                return fn(*args, code=code, **kwargs)

            return spied if name in ("quantize_blockwise", "dequantize_blockwise") else fn

    for stepper in steppers(trainer.optimizer):
        assert isinstance(stepper, GaLoreAdamW8bit)
        stepper._bnbf = Spy(stepper._bnbf)
    with trainer:
        trainer.train()
    assert len(calls) >= 4 * 3  # (de)quantise two moments each step
    tables = {id(t) for stepper in steppers(trainer.optimizer) for t in stepper._codes.values()}
    assert {c for c, _ in calls} == tables and len(tables) == 2  # signed and unsigned, shared by every optimizer
    assert {d for _, d in calls} == {trainer.device}


# -- ZeRO fragments -------------------------------------------------------------------------------------------------


def test_rows_cut_by_zero_partitions_are_completed_without_a_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ZeRO a right projection keeps each fragment's rows of the projected gradient; a row that a partition
    boundary cuts gets the other ranks' partial sums from an all-gather (three ranks simulated here). The sum picks
    the gathered rows that name it: a boolean index did (a synchronisation per cut row), now a where. Each rank's
    rows equal the rank-order sums of the partial rows, in float64, as before."""
    from megatron_pept import sharding

    m, n, k = 4, 5, 3
    x, basis = torch.randn(m, n), torch.randn(k, n)
    frags = [sharding.FlatFragment((m, n), lo=lo, numel=numel, offset=0) for lo, numel in ((0, 7), (7, 6), (13, 7))]
    partial = [f.rows_block(x.reshape(-1)[f.lo : f.hi]) @ basis.T for f in frags]  # each rank's rows r0..r1
    gathered: list[torch.Tensor] = []

    class Gathered(Exception):
        pass

    def record(edges, group=None):
        gathered.append(edges.clone())
        raise Gathered

    monkeypatch.setattr(sharding, "distributed", lambda: True)
    monkeypatch.setattr(sharding, "all_gather_", record)
    for f, rows in zip(frags, partial):
        with pytest.raises(Gathered):
            f.complete_edge_rows(rows.clone())
    monkeypatch.setattr(sharding, "all_gather_", lambda edges, group=None: gathered)
    for f, rows in zip(frags, partial):
        with no_host_sync():
            done = f.complete_edge_rows(rows.clone())
        for r in range(f.r0, f.r1):
            holders = [q for q, g in zip(partial, frags) if g.r0 <= r < g.r1]
            if len(holders) == 1:
                assert torch.equal(done[r - f.r0], rows[r - f.r0])
                continue
            expected = torch.zeros(k, dtype=torch.float64)
            for q, g in zip(partial, frags):
                if g.r0 <= r < g.r1:
                    expected = expected + q[r - g.r0].double()
            assert torch.equal(done[r - f.r0], expected.float()), r
            assert torch.allclose(done[r - f.r0], (x @ basis.T)[r], atol=1e-5)


# -- host counters after a load -------------------------------------------------------------------------------------


def test_host_counters_stay_on_the_host_when_state_is_loaded() -> None:
    """Loaded ``step``, ``refreshes`` and ``seed`` are host tensors whatever device the parameter is on (here the meta
    device stands in for a GPU): on the device every read of them in a step would wait for it. The moments follow
    the parameter; a capturable torch optimizer's step follows it too (its step reads it on the device)."""
    model = torch.nn.Linear(4, 4, bias=False, device="meta")
    p = model.weight
    opt = GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-3)
    saved_state = {
        "step": torch.tensor(3.0),
        "refreshes": torch.tensor(1),
        "seed": torch.tensor(7),
        "exp_avg": torch.zeros(4, 2),
        "exp_avg_sq": torch.zeros(4, 2),
        "projector": torch.zeros(2, 4),
    }
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    opt.load_state_dict({"state": {0: saved_state}, "param_groups": [{**group, "params": [0]}]})
    expected = {k: "cpu" if k in HOST_STATE_KEYS else "meta" for k in saved_state}
    assert {k: v.device.type for k, v in opt.state[p].items()} == expected
    # A checkpoint load (DCP) puts each tensor into the destination made for it.
    meta = {
        f"optim.weight.{k}": TensorStorageMetadata(TensorProperties(dtype=v.dtype), v.shape, [])
        for k, v in saved_state.items()
    }
    destinations = optimizer_destinations(model, opt, meta)
    assert {k.rsplit(".", 1)[1]: v.device.type for k, v in destinations.items()} == expected
    adamw = torch.optim.AdamW([p], capturable=True)
    steps = optimizer_destinations(model, adamw, {"optim.weight.step": meta["optim.weight.step"]})
    assert steps["optim.weight.step"].device.type == "meta"


# -- the guard itself -----------------------------------------------------------------------------------------------


PLANTED = {
    "item": lambda t: t.item(),
    "float": lambda t: float(t),
    "int": lambda t: int(t),
    "if": lambda t: 1 if t > 0 else 0,
    "cpu": lambda t: t.cpu(),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "format": lambda t: f"{t:.3f}",
    "equal": lambda t: torch.equal(t, t),
    "mask": lambda t: t.reshape(1)[t.reshape(1) > 0],
    "nonzero": lambda t: torch.nonzero(t.reshape(1)),
    "tensor": lambda t: torch.tensor(1.0, device=t.device),
    "to": lambda t: t.to(t.device),
}


@pytest.mark.parametrize("planted", list(PLANTED))
def test_the_guard_catches_a_sync_planted_in_a_step(planted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(8, 8)
    opt = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}], lr=1e-3)
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()  # the first step makes the state
    with no_host_sync(host_tensors=lambda: host_counters(opt)):
        opt.step()  # clean
    inner = GaLoreAdamW._inner_update

    def planted_update(self, state, grad, group, param):
        PLANTED[planted](grad.sum())
        return inner(self, state, grad, group, param)

    monkeypatch.setattr(GaLoreAdamW, "_inner_update", planted_update)
    with pytest.raises(HostSyncError), no_host_sync(host_tensors=lambda: host_counters(opt)):
        opt.step()


def test_the_guard_lets_host_counters_be_read_and_nothing_else() -> None:
    counter, value = torch.tensor(3.0), torch.tensor(3.0)
    with no_host_sync(host_tensors=lambda: [counter]):
        assert float(counter) == 3.0 and counter.item() == 3.0
        with pytest.raises(HostSyncError, match=r"Tensor.__float__ at test_step_sync.py:\d+"):
            float(value)
