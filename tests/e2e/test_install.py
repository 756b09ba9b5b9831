"""The package as a user installs it: a wheel built from the sources, installed (not editable) into a fresh venv
with the ``hf`` extra, and its console scripts run from a folder that is not the checkout.

Nothing is downloaded: torch 2.13.0 and every dependency come from the local package sources pip is configured
with on this machine (``pip config list``: the find-links folder holding the CPU torch wheel and the ``file://``
indexes); pip's configuration and PIP_* variables are set aside and only those local sources are passed, so a
remote index is never asked. Without a local source the test skips with one line. The venv (about 1.5 GB, a
minute to make on 2 cores) is made once for the module and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from megatron_pept.data.corpus import generate_stories

REPO = Path(__file__).resolve().parents[2]
TORCH = "2.13.0"  # the tested torch (README, Dockerfile)
SCRIPTS = (
    "megatron-pept-train",
    "megatron-pept-prepare-data",
    "megatron-pept-train-tokenizer",
    "megatron-pept-convert-to-hf",
    "megatron-pept-inspect-checkpoint",
    "megatron-pept-bench",
    "megatron-pept-launch-dir",
    "megatron-pept-study",
    "megatron-pept-plot-runs",
    "megatron-pept-analyze-rank",
    "megatron-pept-gpu-check",
    "megatron-pept-plan",
)

pytestmark = pytest.mark.slow


def _local(location: str) -> Path | None:
    """The folder behind a pip location if it is on this machine (a path or a file:// URL), else None."""
    path = Path(unquote(urlparse(location).path)) if location.startswith("file:") else Path(location)
    return path if path.is_absolute() and path.exists() else None


def local_pip_sources() -> list[str]:
    """pip options naming only this machine's package sources, as pip here is configured; [] if it has none."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    indexes: list[str] = []
    links: list[str] = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        for location in value.strip().strip("'\"").split():
            if option in ("index-url", "extra-index-url") and _local(location) and location not in indexes:
                indexes.append(location)
            elif option == "find-links" and _local(location) and location not in links:
                links.append(location)
    if not indexes and not links:
        return []
    options = ["--index-url", indexes[0]] if indexes else ["--no-index"]
    for location in indexes[1:]:
        options += ["--extra-index-url", location]
    for location in links:
        options += ["--find-links", location]
    return options


def _clean_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if extra_path is not None:
        env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(extra_path.parent)
    return env


def _copy_sources(dest: Path) -> None:
    """What a clone holds (tracked and untracked-but-not-ignored files), so the build sees no local leftovers."""
    listed = None
    if (REPO / ".git").exists() and shutil.which("git"):
        proc = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, timeout=60
        )
        if proc.returncode == 0:
            listed = [name for name in proc.stdout.decode().split("\0") if name]
    if listed is None:
        ignore = shutil.ignore_patterns(
            ".git", ".venv", "runs", "generated", "__pycache__", "build", "dist", "*.egg-info"
        )
        shutil.copytree(REPO, dest, ignore=ignore)
        return
    for name in listed:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _isolation() -> list[str]:
    """Build with the setuptools already installed here when it can build the wheel by itself (70.1 and later
    carry bdist_wheel; pyproject asks for >= 68 and wheel): pip's isolated build environment would install both
    again for each build, a quarter of this test's set-up. An older or missing setuptools keeps the isolation."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except Exception:  # not installed, or a version string of another shape
        return []
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) else []


def _check(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sources = local_pip_sources()
    if not sources:
        pytest.skip("pip has no local package source configured here (pip config list); this test downloads nothing")
    root = tmp_path_factory.mktemp("install")
    try:
        src, dist, venv = root / "src", root / "dist", root / "venv"
        _copy_sources(src)
        _check(
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation(), *sources, "-w", str(dist), str(src)],
                capture_output=True,
                text=True,
                timeout=600,
                env=_clean_env(),
            ),
            "building the wheel",
        )
        (wheel,) = dist.glob("megatron_pept-*.whl")
        _check(
            subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300),
            "python -m venv",
        )
        _check(
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--no-compile",
                    *sources,
                    f"torch=={TORCH}",
                    f"{wheel}[hf]",
                ],
                capture_output=True,
                text=True,
                timeout=900,
                env=_clean_env(),
            ),
            "installing torch and the wheel",
        )
        shutil.rmtree(src)  # nothing of the checkout is left to import from
        yield venv / "bin"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_installed_console_scripts_run_outside_the_checkout(venv_bin: Path, tmp_path: Path) -> None:
    env = _clean_env(venv_bin)
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=600)

    for script in SCRIPTS:
        assert (venv_bin / script).is_file(), f"{script} not installed"
    where = _check(
        run("python", "-c", "import megatron_pept, torch; print(megatron_pept.__file__); print(torch.__version__)"),
        "import",
    ).stdout.split()
    assert Path(where[0]).is_relative_to(venv_bin.parent) and where[1].startswith(TORCH), where  # not the checkout
    assert not (work / "configs").exists()

    corpus = work / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_stories(800, seed=3)))
    tok = _check(
        run("megatron-pept-train-tokenizer", "--input", str(corpus), "--vocab-size", "400", "--output", "tok"),
        "megatron-pept-train-tokenizer",
    )
    assert "400 pieces" in tok.stdout and (work / "tok" / "tokenizer.model").is_file()
    prep = _check(
        run(
            "megatron-pept-prepare-data",
            "--input",
            str(corpus),
            "--tokenizer",
            "tok",
            "--output",
            "data",
            "--val-fraction",
            "0.05",
            "--workers",
            "1",
            "--no-progress",
        ),
        "megatron-pept-prepare-data",
    )
    assert "MB/s" in prep.stdout and (work / "data" / "index.json").is_file()

    # --config quickstart: the configuration shipped in the wheel, on the data just prepared.
    train = _check(
        run(
            "megatron-pept-train",
            "--config",
            "quickstart",
            "run_dir=run",
            "data.path=data",
            "data.builtin=null",
            "data.seq_len=64",
            "train.steps=3",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.eval_batches=1",
            "checkpoint.interval=2",
            "metrics.tensorboard=false",
        ),
        "megatron-pept-train --config quickstart",
    )
    assert "step 3/3" in train.stdout + train.stderr
    resolved = (work / "run" / "config.yaml").read_text()
    assert "name: debug" in resolved and "lr: 0.003" in resolved  # quickstart.yaml's values
    shown = _check(run("megatron-pept-inspect-checkpoint", "run"), "megatron-pept-inspect-checkpoint")
    assert "step       3 of 3" in shown.stdout and "complete   yes" in shown.stdout and "latest     yes" in shown.stdout
    _check(run("megatron-pept-convert-to-hf", "--checkpoint", "run", "--output", "hf"), "megatron-pept-convert-to-hf")
    loaded = _check(
        run(
            "python",
            "-c",
            "import transformers; m = transformers.AutoModelForCausalLM.from_pretrained('hf'); "
            "t = transformers.AutoTokenizer.from_pretrained('hf'); ids = t('Once upon a time')['input_ids']; "
            "print(type(m).__name__, len(ids), t.decode(ids, skip_special_tokens=True))",
        ),
        "loading the export with transformers (the hf extra)",
    )
    assert loaded.stdout.strip().startswith("LlamaForCausalLM") and loaded.stdout.strip().endswith("Once upon a time")

    # The GPU acceptance check on this CPU machine: the real check refuses in one line and fails (a GPU job that
    # lost its GPU must not pass), writing nothing.
    no_gpu = subprocess.run(
        ["megatron-pept-gpu-check", "--json", "gpu_check.json"],
        cwd=work,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert no_gpu.returncode == 2 and no_gpu.stdout == "", no_gpu.stdout + no_gpu.stderr[-2000:]
    assert len(no_gpu.stderr.splitlines()) == 1 and "no CUDA device" in no_gpu.stderr, no_gpu.stderr[-2000:]
    assert not (work / "gpu_check.json").exists()

    # The memory planner from the installed package, by a shipped config's name: no data, no GPU.
    planned = json.loads(
        _check(run("megatron-pept-plan", "--config", "quickstart", "--json"), "megatron-pept-plan").stdout
    )
    assert planned["settings"]["model"] == "debug" and planned["peak_bytes"] > 0

    # include: between shipped files (relora_130m.yaml includes full_130m.yaml), by a bare name with .yaml too.
    printed = _check(run("megatron-pept-train", "--config", "relora_130m.yaml", "--print-config"), "--print-config")
    assert "name: 130m" in printed.stdout and "name: relora" in printed.stdout

    # Launch scripts ship with the package and run from where it is installed.
    launch = Path(_check(run("megatron-pept-launch-dir"), "megatron-pept-launch-dir").stdout.strip())
    assert launch.is_relative_to(venv_bin.parent)
    for name in ("torchrun.sh", "deepspeed.sh", "slurm.sbatch"):
        assert os.access(launch / name, os.X_OK), name
    env_one = {**env, "NPROC_PER_NODE": "1"}
    torchrun = subprocess.run(
        [str(launch / "torchrun.sh"), "--config", "quickstart", "--print-config"],
        cwd=work,
        env=env_one,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torchrun.returncode == 0 and "name: debug" in torchrun.stdout, torchrun.stderr[-2000:]

    # Mistakes: one line naming the installed command, exit code 2.
    bench = run("megatron-pept-bench", "--model", "3b")
    assert bench.returncode == 2 and bench.stderr.startswith("megatron-pept-bench: error:"), bench.stderr
    assert bench.stderr.strip().count("\n") == 0
    no_tok = run("megatron-pept-prepare-data", "--input", str(corpus), "--tokenizer", "nowhere", "--output", "d2")
    assert no_tok.returncode == 2 and no_tok.stderr.strip().count("\n") == 0, no_tok.stderr
    assert (
        no_tok.stderr.startswith("megatron-pept-prepare-data: error:")
        and "megatron-pept-train-tokenizer" in no_tok.stderr
    )
    missing = run("megatron-pept-train", "--config", "configs/quickstart.yaml")
    assert missing.returncode == 2 and "pass --config quickstart" in missing.stderr, missing.stderr
    assert missing.stderr.strip().count("\n") == 0
