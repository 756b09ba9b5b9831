"""The Dockerfile and .dockerignore, checked without a Docker daemon: what it copies exists and is not ignored, it
pins the tested torch, installs the package from its sources (not editable), keeps the GPU extras behind a build
argument and a layer of their own, and its CMD is a console script whose arguments work (run here, outside a
container, on the quickstart data with a few steps)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
TESTED_TORCH = "2.13.0"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` (or a folder above it) out of the context: a pattern matches from the
    root, ``**/`` at any depth."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parts = Path(path).parts
    for end in range(1, len(parts) + 1):
        for pattern in patterns:
            starts = range(end) if pattern.startswith("**/") else [0]
            if any(fnmatch.fnmatch("/".join(parts[i:end]), pattern.removeprefix("**/")) for i in starts):
                return True
    return False


def test_copy_sources_exist_and_are_in_the_context() -> None:
    copies = [shlex.split(args) for word, args in instructions() if word == "COPY"]
    assert copies
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        for source in args[:-1]:
            if source == ".":
                continue
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (
        ".git",
        ".venv",
        "runs",
        "data/generated",
        "megatron_pept.egg-info",
        "ckpt/x.pt",
        "megatron_pept/__pycache__",
    ):
        assert ignored(path), path
    for path in (
        "megatron_pept/train.py",
        "configs/quickstart.yaml",
        "launch/torchrun.sh",
        "pyproject.toml",
        "setup.py",
    ):
        assert not ignored(path), path


def test_torch_pin_and_install() -> None:
    steps = instructions()
    args = dict(a.partition("=")[::2] for word, a in steps if word == "ARG")
    assert args["TORCH_VERSION"] == TESTED_TORCH
    assert f"pip install torch=={TESTED_TORCH}" in (REPO / "README.md").read_text()
    assert f"pip install torch=={TESTED_TORCH}" in (REPO / "pyproject.toml").read_text()
    assert f'TORCH = "{TESTED_TORCH}"' in (REPO / "tests" / "e2e" / "test_install.py").read_text()
    assert re.search(r"cu\d+", args["TORCH_INDEX_URL"]) and "cuda" in args["BASE_IMAGE"]
    cuda = re.search(r"cuda:(\d+)\.(\d+)", args["BASE_IMAGE"]).groups()
    assert args["TORCH_INDEX_URL"].endswith("cu" + "".join(cuda)), "torch's CUDA build must match the base image"
    runs = " ".join(a for word, a in steps if word == "RUN")
    assert "pip install -e" not in runs and "--editable" not in runs
    assert "pip install --no-build-isolation --no-deps /src" in runs  # the package itself, not editable
    gpu = next(a for word, a in steps if word == "RUN" and ".[gpu]" in a)
    assert '"${WITH_GPU_EXTRAS}" = "1"' in gpu and "--no-build-isolation" in gpu
    assert args["WITH_GPU_EXTRAS"] == "0"


@pytest.mark.slow  # a process
def test_cmd_is_a_console_script_that_runs(quickstart_data: Path, tmp_path: Path) -> None:
    (cmd,) = [json.loads(a) for word, a in instructions() if word == "CMD"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts, cmd
    module, _, attr = scripts[cmd[0]].partition(":")
    # The CMD's own command line, run as its console script would (entry point called, argv[0] its name), from a
    # folder that is not the checkout, with the prepared quickstart data and a few steps.
    launcher = f"import sys; sys.argv[0] = {cmd[0]!r}; from {module} import {attr}; sys.exit({attr}())"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            launcher,
            *cmd[1:],
            f"run_dir={tmp_path / 'run'}",
            f"data.path={quickstart_data}",
            "train.steps=3",
            "train.eval_interval=3",
            "train.eval_batches=1",
            "metrics.tensorboard=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3/3" in proc.stdout + proc.stderr
    assert "name: debug" in (tmp_path / "run" / "config.yaml").read_text()  # quickstart.yaml's model
