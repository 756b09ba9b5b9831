"""The data tools as a user runs them: train a tokenizer, prepare shards, train on them; bad input fails cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pept.data.corpus import generate_stories

REPO = Path(__file__).resolve().parents[2]


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_stories(3000, seed=11)))
    return path


def test_tokenizer_prepare_train(corpus: Path, tmp_path: Path) -> None:
    tok = tool("train_tokenizer.py", "--input", str(corpus), "--vocab-size", "700", "--output", str(tmp_path / "tok"))
    assert tok.returncode == 0, tok.stderr
    assert (tmp_path / "tok" / "tokenizer.model").is_file() and (tmp_path / "tok" / "tokenizer_meta.json").is_file()
    prep = tool(
        "prepare_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "data"),
        "--shard-tokens",
        "20000",
        "--val-fraction",
        "0.05",
        "--workers",
        "2",
        "--no-progress",
    )
    assert prep.returncode == 0, prep.stderr
    assert "MB/s" in prep.stdout
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert index["vocab_size"] == 700 and len(index["splits"]["train"]["shards"]) > 3
    again = tool(
        "prepare_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "data"),
        "--shard-tokens",
        "20000",
        "--val-fraction",
        "0.05",
        "--no-progress",
    )
    assert again.returncode == 0 and "already complete" in again.stdout
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_pept.train",
            f"run_dir={tmp_path / 'run'}",
            f"data.path={tmp_path / 'data'}",
            "data.seq_len=64",
            "train.steps=3",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.eval_batches=1",
            "metrics.tensorboard=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr
    assert "step 3/3" in train.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--input", "/nonexistent/x.jsonl", "--vocab-size", "100", "--output", "{tmp}/t"], "does not exist"),
        (
            ["--input", "{corpus}", "--vocab-size", "100", "--output", "{tmp}/t", "--text-field", "body"],
            "has no field 'body'",
        ),
    ],
)
def test_tokenizer_tool_errors(args: list[str], expected: str, corpus: Path, tmp_path: Path) -> None:
    proc = tool("train_tokenizer.py", *[a.format(tmp=tmp_path, corpus=corpus) for a in args])
    assert proc.returncode == 2
    assert expected in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_prepare_tool_errors(corpus: Path, tmp_path: Path) -> None:
    proc = tool(
        "prepare_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tmp_path / "none"),
        "--output",
        str(tmp_path / "d"),
    )
    assert proc.returncode == 2 and "no tokenizer" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "d").exists()


READ_ONLY_SHM = (  # run "$@" where /dev/shm is a read-only bind of itself, in this mount namespace only
    "mount --bind /dev/shm /dev/shm && mount -o bind,remount,ro /dev/shm || exit 97; "
    "if touch /dev/shm/.megatron-pept-ro-check 2>/dev/null; then rm -f /dev/shm/.megatron-pept-ro-check; exit 98; fi; "
    'exec "$@"'
)


def test_a_read_only_dev_shm_is_one_line(corpus: Path, quickstart_data: Path, tmp_path: Path) -> None:
    """datasets keeps a streaming dataset's counter in torch shared memory, so with /dev/shm read-only (some
    containers) every read failed: prepare-data with a torch traceback, train-tokenizer with "no text to train the
    tokenizer on" (it took any failure before the first document for an empty input). Both now say what is wrong
    in one line and exit 2. Needs a private mount namespace (root and unshare); the host's /dev/shm is untouched."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to give the tools a read-only /dev/shm")
    runs = {
        "train_tokenizer.py": ["--input", str(corpus), "--vocab-size", "700", "--output", str(tmp_path / "tok")],
        "prepare_data.py": ["--input", str(corpus), "--tokenizer", str(quickstart_data / "tokenizer.model")]
        + ["--output", str(tmp_path / "data"), "--workers", "1", "--no-progress"],
    }
    for name, args in runs.items():
        cmd = [sys.executable, str(REPO / "tools" / name), *args]
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_SHM, "sh", *cmd],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode in (97, 98) or proc.stderr.startswith("unshare:"):
            pytest.skip(f"cannot make /dev/shm read-only in a namespace of its own here: {proc.stderr.strip()[:200]}")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
        assert "needs a writable /dev/shm" in proc.stderr and "Read-only file system" in proc.stderr, proc.stderr
    assert not (tmp_path / "tok").exists() and not list((tmp_path / "data").glob("*"))


@pytest.mark.parametrize("name", ["train_tokenizer.py", "prepare_data.py"])
def test_help(name: str) -> None:
    proc = tool(name, "--help")
    assert proc.returncode == 0 and "--input" in proc.stdout
