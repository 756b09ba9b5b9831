"""No host synchronisation and no per-call host-to-device copy in the optimizer step (issue 27, item 4).

A step of every registered method (global steps, and per-layer updates where the step runs inside backward) is
run under :func:`sync_guard.no_host_sync`: the optimizer's step, the method's ``on_step_end`` and the writing of its
scalars may read no tensor's value on the host and copy no host data to the device. Method statistics are kept as
tensors and read once per ``train.log_interval``; at that logging step they must equal what the host arithmetic of
the statistics computed before they became tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sync_guard import HostSyncError, no_host_sync
from test_trainer import tiny

from megatron_pept.methods import METHODS
from megatron_pept.optim import HOST_STATE_KEYS
from megatron_pept.optim.galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreOptimizer
from megatron_pept.optim.per_layer import PerLayerOptimizer
from megatron_pept.optim.projector import subspace_overlap
from megatron_pept.sharding import optimizer_protocol
from megatron_pept.trainer import Trainer

STEPS, LOG_INTERVAL = 4, 4  # steps 1 and 2 (0-based) are guarded: neither the first step nor a logging step


def host_tensors(trainer: Trainer):
    """The optimizer's host counters (``step``, ``refreshes``, ``seed``): host tensors by design, read for free."""

    def tensors():
        return [v for s in trainer.optimizer.state.values() for k, v in s.items() if k in HOST_STATE_KEYS]

    return tensors


def step_functions(optimizer) -> list:
    """The objects whose ``step`` updates parameters: the per-parameter optimizers of per-layer updates (stepped in
    backward hooks), or the optimizer itself."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, PerLayerOptimizer) else [optimizer]


class GuardedRun:
    """A trainer whose optimizer steps, ``on_step_end`` and method-scalar writes run under the guard on the steps
    in ``guarded``; records every scalar TensorBoard receives and each step's optimizer statistics."""

    def __init__(self, trainer: Trainer, *, guarded: set[int]) -> None:
        self.trainer, self.guarded = trainer, guarded
        self.written: list[tuple[str, int, object]] = []
        self.stats: dict[int, dict] = {}  # steps done -> step_stats() right after on_step_end
        self.projectors: dict[int, tuple[dict, dict]] = {}  # steps done -> projectors before and after the step
        self.violations: list[str] = []
        for sub in step_functions(trainer.optimizer):
            sub.step = self._guard(sub.step)
        method_end = trainer.method.on_step_end

        def on_step_end(**kw):
            before = self._projectors()
            end = self._guard(method_end)(**kw)
            done = trainer.state.step + 1  # steps done, the step TensorBoard files it under
            self.stats[done] = optimizer_protocol(kw["optimizer"]).step_stats()
            self.projectors[done] = (self._before, before)
            return end

        trainer.method.on_step_end = on_step_end
        trainer.writer.scalars = self._guard(trainer.writer.scalars)
        tb = trainer.writer._writer
        add_scalar = tb.add_scalar

        def record(tag, value, global_step=None, **kw):
            self.written.append((tag, global_step, value))
            return add_scalar(tag, value, global_step=global_step, **kw)

        tb.add_scalar = record
        train_step = trainer.train_step

        def train_step_with_projectors():
            self._before = self._projectors()
            return train_step()

        trainer.train_step = train_step_with_projectors

    def _projectors(self) -> dict:
        return {p: s["projector"].clone() for p, s in self.trainer.optimizer.state.items() if "projector" in s}

    def _guard(self, fn):
        def guarded(*args, **kwargs):
            if self.trainer.state.step not in self.guarded:
                return fn(*args, **kwargs)
            with no_host_sync(host_tensors=host_tensors(self.trainer)) as seen:
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.violations.extend(seen)

        return guarded

    def method_scalars(self) -> dict[int, dict[str, object]]:
        out: dict[int, dict[str, object]] = {}
        for tag, step, value in self.written:
            if tag.split("/")[0] in ("galore", "relora"):
                out.setdefault(step, {})[tag] = value
        return out


def run(data: Path, run_dir: Path, method: str, *extra: str, guarded: set[int]) -> GuardedRun:
    cfg = tiny(
        data,
        run_dir,
        f"method.name={method}",
        *(["method.rank=4"] if "rank" in METHODS[method].config_keys else []),
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
    r = run(quickstart_data, tmp_path, name, f"optim.per_layer={str(per_layer).lower()}", guarded={1, 2})
    assert not r.violations, r.violations  # also those some code might have caught
    # Every step's method scalars reached TensorBoard as floats, read at the logging step (4): none is lost.
    scalars = r.method_scalars()
    if name in ("full", "adam_mini"):
        assert not scalars
        return
    assert sorted(scalars) == [1, 2, 3, 4]
    assert all(type(v) is float for step in scalars.values() for v in step.values())
    assert len({frozenset(s) for s in scalars.values()}) == 1  # the same tags every step
    check_statistics(r, name, per_layer)


def check_statistics(r: GuardedRun, name: str, per_layer: bool) -> None:
    """The logged statistics equal the host arithmetic that computed them before they were tensors (the formulas
    of the method's ``on_step_end`` as they were, applied to each step's optimizer statistics), and, where they are
    a function of the state, an independent computation from it."""
    scalars, trainer = r.method_scalars(), r.trainer
    if name in ("lora", "relora", "redora", "repissa", "reloqra"):
        from megatron_pept.methods.relora import lowrank_layers

        with torch.no_grad():
            norms = [p.float().norm() for _, layer in lowrank_layers(trainer.raw_model) for p in layer.adapter_parameters()]
            expected = float(torch.linalg.vector_norm(torch.stack(norms)))
        assert scalars[STEPS]["relora/adapter_norm"] == expected
        return
    activations = 0
    for step in range(STEPS):
        stats, logged = r.stats[step + 1], scalars[step + 1]
        if stats["overlaps"]:
            overlaps = [float(o) for o in stats["overlaps"]]
            assert logged["galore/subspace_overlap"] == sum(overlaps) / len(overlaps)
        if METHODS[name].error_feedback:
            assert logged["galore/ef_residual_norm"] == pytest.approx(float(stats["ef_residual_sq"]) ** 0.5, rel=1e-15)
        if stats["scaled_matrices"]:
            limited = int(stats["limited_matrices"])
            activations += limited
            assert logged["galore/scaling_factor"] == float(stats["scaling_factor_sum"]) / stats["scaled_matrices"]
            assert logged["galore/limited_fraction"] == limited / stats["scaled_matrices"]
            assert logged["galore/limiter_activations"] == float(activations)
    # From the state: the error-feedback residual kept is the last step's, summed over the matrices in step order.
    if METHODS[name].error_feedback:
        order = trainer.optimizer._last_stepped if per_layer else [trainer.optimizer]
        total = 0.0
        for opt in order:
            for p, s in opt.state.items():
                if "ef_residual" in s and (not per_layer or p in opt.state):
                    total += float(s["ef_residual"].square().sum())
        assert float(r.stats[STEPS]["ef_residual_sq"]) == total
        assert scalars[STEPS]["galore/ef_residual_norm"] == pytest.approx(math.sqrt(total), rel=1e-15)


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_a_refresh_logs_the_subspace_overlap_of_the_projectors(per_layer: bool, quickstart_data: Path, tmp_path):
    """A refresh (every update_proj_gap steps; it may synchronise: SVD) logs the mean overlap of the old and new
    projectors, computed from them as before."""
    r = run(
        quickstart_data,
        tmp_path,
        "galore",
        "method.update_proj_gap=2",
        f"optim.per_layer={str(per_layer).lower()}",
        guarded={1},
    )
    assert not r.violations
    before, after = r.projectors[3]  # step index 2 is a refresh: state.step is 3 once it ended
    overlaps = [subspace_overlap(before[p], after[p], side="right" if p.shape[0] >= p.shape[1] else "left") for p in after]
    logged = r.method_scalars()[3]["galore/subspace_overlap"]
    assert logged == pytest.approx(sum(overlaps) / len(overlaps), rel=1e-12)


# -- the 8-bit code table -------------------------------------------------------------------------------------------


def test_the_8bit_code_tables_are_made_once_per_device(quickstart_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    calls: list[tuple[int, torch.device]] = []
    trainer = Trainer(
        tiny(
            quickstart_data,
            tmp_path,
            "method.name=galore_8bit",
            "method.rank=4",
            "train.steps=3",
            "train.eval_interval=0",
            "train.eval_at_start=false",
        )
    )
    opt = trainer.optimizer
    assert isinstance(opt, GaLoreAdamW8bit)
    bnbf = opt._bnbf

    class Spy:
        def __getattr__(self, name):
            fn = getattr(bnbf, name)

            def spied(*args, code, **kwargs):
                calls.append((id(code), code.device))
                return fn(*args, code=code, **kwargs)

            return spied if name in ("quantize_blockwise", "dequantize_blockwise") else fn

    opt._bnbf = Spy()
    with trainer:
        trainer.train()
    assert len(calls) > 10
    assert len({c for c, _ in calls}) == 2  # one signed and one unsigned table, the same objects every step
    assert {d for _, d in calls} == {trainer.device}


# -- the guard itself -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "planted",
    [
        lambda t: t.item(),
        lambda t: float(t),
        lambda t: int(t),
        lambda t: bool(t > 0),
        lambda t: t.cpu(),
        lambda t: t.tolist(),
        lambda t: t.numpy(),
        lambda t: torch.equal(t, t),
        lambda t: t.reshape(1)[t.reshape(1) > 0],
        lambda t: torch.nonzero(t.reshape(1)),
        lambda t: torch.tensor(1.0, device=t.device),
        lambda t: t.to(t.device),
        lambda t: f"{t:.3f}",
    ],
    ids=["item", "float", "int", "bool", "cpu", "tolist", "numpy", "equal", "mask", "nonzero", "tensor", "to", "format"],
)
def test_the_guard_catches_a_planted_sync_in_a_step(planted, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(8, 8)
    opt = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}], lr=1e-3)
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()  # the first step makes the state (it may build host counters)

    def host():
        return [v for s in opt.state.values() for k, v in s.items() if k in HOST_STATE_KEYS]

    with no_host_sync(host_tensors=host):
        opt.step()  # clean
    inner = GaLoreAdamW._inner_update

    def planted_update(self, state, grad, group, param):
        planted(grad.sum())
        return inner(self, state, grad, group, param)

    monkeypatch.setattr(GaLoreAdamW, "_inner_update", planted_update)
    with pytest.raises(HostSyncError), no_host_sync(host_tensors=host):
        opt.step()


def test_the_guard_lets_host_counters_be_read_but_nothing_else() -> None:
    counter, value = torch.tensor(3.0), torch.tensor(3.0)
    with no_host_sync(host_tensors=lambda: [counter]):
        assert float(counter) == 3.0 and counter.item() == 3.0
        with pytest.raises(HostSyncError):
            float(value)


def test_host_counters_stay_on_the_host_when_state_is_loaded() -> None:
    """A loaded ``step`` (``refreshes``, ``seed``) stays a host tensor whatever device the parameter is on: on a GPU,
    moving it there would make every read of it in the step a synchronisation (here the meta device stands in)."""
    p = torch.nn.Parameter(torch.zeros(4, 4, device="meta"))
    opt = GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-3)
    saved = {
        "state": {0: {"step": torch.tensor(3.0), "refreshes": torch.tensor(1), "seed": torch.tensor(7),
                      "exp_avg": torch.zeros(4, 2), "exp_avg_sq": torch.zeros(4, 2), "projector": torch.zeros(4, 2)}},
        "param_groups": [{**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "params": [0]}],
    }
    opt.load_state_dict(saved)
    state = opt.state[p]
    assert {k: v.device.type for k, v in state.items()} == {
        "step": "cpu", "refreshes": "cpu", "seed": "cpu", "exp_avg": "meta", "exp_avg_sq": "meta", "projector": "meta"
    }
    assert isinstance(opt, GaLoreOptimizer)
