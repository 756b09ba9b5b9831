"""Shared by the distributed tests: the small training config and the multi-process launch of worker.py, once per
launcher for the whole session (shared_launch)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Losses agree to float rounding (different reduction order); weights after 4 steps to 1e-4 (8-bit: quantisation
# blocks differ with the shard layout).
LOSS_TOL, WEIGHT_TOL, WEIGHT_TOL_8BIT = 1e-4, 1e-4, 2e-3


def base(data: Path, run_dir: Path, micro: int) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.seq_len=32",
        "train.steps=4",
        "train.global_batch_size=8",
        f"train.micro_batch_size={micro}",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "metrics.tensorboard=false",
        "metrics.peak_tflops=1",
        "method.rank=8",
        "method.update_proj_gap=2",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "train.max_grad_norm=1.0",
        "data.verify_checksums=false",
    ]


def saving_at(step: int) -> list[str]:
    """Overrides for an uninterrupted run that also saves after ``step`` (and at its end), so that a second run
    can resume from that checkpoint (:func:`resume_from`) instead of a third, interrupted run making it; a save
    leaves training unchanged (the interrupted form is kept for one case of each plan, and the e2e tests compare
    runs saving at every step with runs saving only at the end)."""
    return [f"checkpoint.interval={step}", f"checkpoint.keep_every={step}"]


def resume_from(run_dir: Path, step: int) -> str:
    """The override resuming from the checkpoint ``run_dir`` saved after ``step``."""
    return f"checkpoint.resume={run_dir / 'checkpoints' / f'step_{step:08d}'}"


def resume_runs(name: str, tmp: Path, make: Callable[[Path], list[str]], *, stop: int) -> list[dict]:
    """An uninterrupted run (in ``tmp/whole-NAME``) that also saves after ``stop`` steps, and a run (in
    ``tmp/cut-NAME``) resuming from that checkpoint (:func:`saving_at`); ``make(run_dir)``: a run's overrides."""
    whole = tmp / f"whole-{name}"
    return [
        {"name": f"whole-{name}", "overrides": [*make(whole), *saving_at(stop)]},
        {"name": f"resume-{name}", "overrides": [*make(tmp / f"cut-{name}"), resume_from(whole, stop)]},
    ]


def assert_bit_identical(whole: dict, resumed: dict, *, stop: int) -> None:
    """A resumed run's losses and final weights equal the uninterrupted run's after step ``stop``, bit for bit."""
    assert resumed["losses"] == whole["losses"][stop:]
    assert resumed["params"].keys() == whole["params"].keys()
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(runs: list[dict], tmp: Path, *, launcher: str = "torchrun", timeout: float = 900) -> dict:
    (tmp / "runs.json").write_text(json.dumps(runs))
    # DeepSpeed's CPU shared-memory all-reduce must not be JIT-built (megatron_pept.distributed): a build would land
    # in this folder.
    extensions = tmp / "torch_extensions"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}
    port = str(free_port())
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", port]
    worker = [str(REPO / "tests/distributed/worker.py"), str(tmp / "runs.json"), str(tmp / "out.pt")]
    proc = subprocess.run([*command, *worker], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    (tmp / "launch.log").write_text(proc.stdout + proc.stderr)  # each run's start, for a failure or a slow launch
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not extensions.exists(), f"a C++ extension was compiled during the runs: {sorted(extensions.rglob('*'))}"
    return torch.load(tmp / "out.pt", weights_only=True)


# -- one launch per launcher for the session ---------------------------------------------------------------------

Plan = Callable[[Path, Path], list[dict]]
PLANS: dict[str, tuple[str, Plan]] = {}  # "module.plan" -> (launcher, plan), in the order the modules declare them


def shared_launch(launcher: str, *, optional: bool = False):
    """Make ``plan(data, tmp) -> runs`` (worker.py's runs, in ``tmp``, a folder of the plan's own) a module fixture
    of the plan's name holding ``(results, tmp)``: the results of its runs, by their names.

    The first such fixture a test needs launches the runs of every plan for ``launcher`` ("torchrun" or "deepspeed")
    that the selected tests need, all in one launch of worker.py: a launch costs about 10 s (torchrun) or 30 s
    (DeepSpeed) on 2 cores before its first run starts, and the runs inside one are as they would be alone (each
    its own Trainer, in order). A deepspeed plan skips where DeepSpeed is not installed (``optional``: holds None
    instead, for a fixture that merges it with a torchrun plan's results)."""

    def decorate(plan: Plan):
        key = f"{plan.__module__}.{plan.__name__}"
        PLANS[key] = (launcher, plan)

        @pytest.fixture(scope="module", name=plan.__name__)
        def launched(shared_launches: SharedLaunches) -> tuple[dict, Path] | None:
            if optional and launcher == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                return None
            return shared_launches.results(key)

        return launched

    return decorate


class SharedLaunches:
    """The session's launches of worker.py (the ``shared_launches`` fixture of tests/distributed/conftest.py)."""

    def __init__(self, session: pytest.Session, data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.session, self.data, self.factory = session, data, tmp_path_factory
        self.launched: dict[str, dict[str, tuple[dict, Path] | BaseException]] = {}

    def needed(self, launcher: str) -> list[str]:
        """The plans for ``launcher`` that some selected test uses (directly or through another fixture)."""
        used = set()
        for item in self.session.items:
            module = getattr(item, "module", None)
            if module is not None:
                used.update(f"{module.__name__}.{name}" for name in getattr(item, "fixturenames", ()))
        return [key for key, (kind, _) in PLANS.items() if kind == launcher and key in used]

    def results(self, key: str) -> tuple[dict, Path]:
        launcher = PLANS[key][0]
        if launcher == "deepspeed":
            pytest.importorskip("deepspeed")
        if launcher not in self.launched:
            self.launched[launcher] = self._launch(launcher, [*self.needed(launcher), key])
        if key not in self.launched[launcher]:  # a plan no selected test seemed to need when the launch was made
            self.launched[launcher].update(self._launch(launcher, [key]))
        outcome = self.launched[launcher][key]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _launch(self, launcher: str, keys: list[str]) -> dict[str, tuple[dict, Path] | BaseException]:
        outcomes: dict[str, tuple[dict, Path] | BaseException] = {}
        folders, runs = {}, []
        for key in dict.fromkeys(keys):
            tmp = self.factory.mktemp(key.rsplit(".", 1)[1])
            try:
                planned = PLANS[key][1](self.data, tmp)
            except pytest.skip.Exception as skipped:  # e.g. an optional package missing: only its tests skip
                outcomes[key] = skipped
                continue
            folders[key] = tmp
            runs += [{**run, "name": f"{key}/{run['name']}"} for run in planned]
        if not folders:
            return outcomes
        try:  # the time limit of the launches it replaces, together
            results = launch(runs, self.factory.mktemp(launcher), launcher=launcher, timeout=900 * len(folders))
        except Exception as err:  # every test of the launch fails with it (it is not launched again for each)
            return {**outcomes, **dict.fromkeys(folders, err)}
        for key, tmp in folders.items():
            mine = {name.split("/", 1)[1]: result for name, result in results.items() if name.startswith(f"{key}/")}
            outcomes[key] = (mine, tmp)
        return outcomes


def quantised_bases(model) -> dict:
    """Each quantised layer's fp32 master (``NAME.base_master``) and the base its forward computes with
    (``NAME.dequantized_base``), whole (every rank must call this: sharded parts are gathered)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, module in model.named_modules():
        if getattr(module, "quantised", False):
            master = module._buffers.get("base_master")
            if master is not None:
                out[f"{name}.base_master"] = (master.full_tensor() if isinstance(master, DTensor) else master).cpu()
            out[f"{name}.dequantized_base"] = module.dequantized_base().cpu()
    return out
