"""Shared fixtures (the built-in quickstart data, made once per test session, no download) and the two tiers.

`pytest -m "not slow"` is the inner loop (1.5 minutes on 2 cores with two xdist workers); `pytest` runs everything.
A test is `slow` when it starts a process (subprocess, torchrun, deepspeed, multiprocessing), builds a wheel or
trains more than a few steps. Every test under tests/e2e, tests/distributed and tests/gpu is slow by its folder
(marked below, so a new one cannot land in the fast tier); a slow unit test says so itself (``@pytest.mark.slow``,
or ``pytestmark`` for a module). A test not marked slow that starts a process (in its body or a function-scoped
fixture) fails, naming the marker it lacks.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from pathlib import Path

import pytest
import torch

# Tiny models on a shared CPU are fastest on one intra-op thread: two torch processes on two cores, each with two
# threads, slow each other 10-30x (DESIGN.md; here 6 steps of the debug model took 0.3 s on one thread and 30 s on
# two while another test run had the other core). This process uses one, and so does every process a test starts
# (they inherit the variable), unless OMP_NUM_THREADS says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TESTS = Path(__file__).resolve().parent
SLOW_FOLDERS = ("e2e", "distributed", "gpu")


# The longest work first: pytest-xdist hands each worker the next scope (a module, or tests/distributed whole) in
# collection order, so scopes that take minutes (tests/distributed's shared launches, the wheel install, the e2e
# CLIs) start at once and the run ends on short unit modules instead of on a long scope started last.
FIRST = ("distributed/", "e2e/test_install.py", "e2e/")


def _start_rank(item: pytest.Item) -> int:
    if not item.path.is_relative_to(TESTS):
        return len(FIRST)
    where = item.path.relative_to(TESTS).as_posix()
    return next((i for i, prefix in enumerate(FIRST) if where.startswith(prefix)), len(FIRST))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(TESTS) and item.path.relative_to(TESTS).parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
    items.sort(key=_start_rank)  # stable: the order inside each group stays as collected


OWN_SCOPE = ("tests/distributed/test_launchers.py",)
"""Modules under tests/distributed that use none of its shared launches (each test starts its own launcher): a scope
of their own, which the other worker can take while one runs the shared launches."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadscope` (pyproject's addopts: two pytest-xdist workers) sends each test module to one worker, and
    every test under tests/distributed (but OWN_SCOPE) to one worker together: its session fixture launches the
    runs of all of them at once (helpers.shared_launch), so a second worker would launch them all again. Every test
    under tests/gpu
    goes to one worker too: two workers would share the one GPU, and the acceptance check's timings with it."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndDistributed(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module in OWN_SCOPE:
                return module
            for folder in ("tests/distributed", "tests/gpu"):
                if module.startswith(f"{folder}/"):
                    return folder
            return module

    return ModulesAndDistributed(config, log)


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_pept.data.builtin import ensure_builtin_dataset

    # One process (workers=1): the same shards as the built-in default of 2 workers, without starting any.
    return ensure_builtin_dataset("quickstart", tmp_path_factory.mktemp("data") / "quickstart", workers=1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# The ways a test starts a process: subprocess (run, Popen, check_output, os.popen) ends in Popen._execute_child;
# multiprocessing and torch.multiprocessing (any start method, pools and executors) in BaseProcess.start; the rest
# are os functions. Not os.system: the poisoned-checkpoint tests pickle it as their payload (tests/poisoned.py).
PROCESS_STARTERS = [
    (subprocess.Popen, "_execute_child"),
    (multiprocessing.process.BaseProcess, "start"),
    *((os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp") if hasattr(os, name)),
]


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of the fast tier that starts a process fails: mark it slow (see the module docstring)."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow (tests/conftest.py), or keep it "
            "in this process"
        )

    for owner, name in PROCESS_STARTERS:
        monkeypatch.setattr(owner, name, refuse)
