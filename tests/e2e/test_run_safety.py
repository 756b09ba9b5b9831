"""Data safety through the real entry point: one run per run_dir, checks before the first step (writable folders,
room for a checkpoint), a failed save that stops the run cleanly, the tokenizer checked on resume, and bad input
that is one line. Faults are injected on observed progress (megatron_pept.faults), never after a sleep."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import ENV, run, small_run, start, train_command
from megatron_pept.checkpoint import list_checkpoints, newest_complete
from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE


def command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_command(*small_run(data, run_dir, "train.steps=6", "checkpoint.interval=2", *extra))


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_full_tensors(newest_complete(run_dir / "checkpoints").path, prefix="model.")


def test_a_second_run_on_the_same_run_dir_is_refused(quickstart_data: Path, tmp_path: Path) -> None:
    """The first run, frozen after step 2 (it holds run_dir), meets a second one on the same run_dir: refused with
    one line naming the holder, nothing of the first touched; the first then finishes exactly like a lone run."""
    lone = run(command(quickstart_data, tmp_path / "lone"))
    assert lone.returncode == 0, lone.stderr[-3000:]
    shared = tmp_path / "shared"
    first = start(
        command(quickstart_data, shared),
        env={**ENV, ENV_VAR: "step.end@3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output = []
        for line in first.stdout:
            output.append(line)
            if FAULT_FROZEN_LINE in line:
                break
        else:
            pytest.fail(f"setup: the first run ended before its fault point:\n{''.join(output[-30:])}")
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        before = sorted(p.name for p in (shared / "checkpoints").iterdir())
        second = run(command(quickstart_data, shared, "train.steps=8"))
        error = one_line_error(second)
        assert "is in use by another run" in error and f"pid {first.pid}" in error, error
        assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == before
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGCONT)
    output += first.stdout.readlines()
    first.stdout.close()
    assert first.wait() == 0, "".join(output[-30:])
    theirs, ours = weights(tmp_path / "lone"), weights(shared)
    assert theirs.keys() == ours.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def test_an_unwritable_run_dir_is_one_line(quickstart_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    error = one_line_error(run(command(quickstart_data, blocker / "run")))
    assert "cannot create" in error and "run_dir" in error


def mounted_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root only); False where this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounts = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        if not mounted_tmpfs(path, options):
            pytest.skip("needs root and tmpfs mounts (mount -t tmpfs)")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_checkpoint_folder_is_refused_before_the_first_step(quickstart_data, tmp_path, tmpfs) -> None:
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount
        read_only = tmpfs("ro", "ro,size=1m")
        reason = "Read-only file system"
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
        reason = "Permission denied"
    proc = run(command(quickstart_data, tmp_path / "run", f"checkpoint.dir={read_only / 'ckpt'}"))
    error = one_line_error(proc)
    assert reason in error and str(read_only) in error
    assert "step 1/" not in proc.stdout  # nothing trained in vain
    assert not (tmp_path / "run").exists()  # and nothing written


def test_a_file_size_limit_below_a_checkpoint_is_refused_before_the_first_step(quickstart_data, tmp_path) -> None:
    """`ulimit -f` (a size limit any user can set) smaller than a checkpoint: refused with one line up front, not
    found at the first save."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing

    proc = run(command(quickstart_data, tmp_path / "run"), preexec_fn=limit)
    error = one_line_error(proc)
    assert "ulimit -f" in error and "step 1/" not in proc.stdout


@pytest.fixture(scope="module")
def checkpoint_bytes(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """The size of one checkpoint of these runs (a two-step run saves one)."""
    probe = tmp_path_factory.mktemp("probe")
    proc = run(command(quickstart_data, probe, "train.steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sum(p.stat().st_size for p in (probe / "checkpoints" / "step_00000002").rglob("*"))


def test_a_checkpoint_folder_without_room_for_one_checkpoint_is_refused_before_the_first_step(
    quickstart_data, checkpoint_bytes, tmp_path, tmpfs
) -> None:
    """Less free space than one checkpoint of the run (estimated from the model and optimizer state): one line
    naming both sizes before any step is trained, nothing written into the folder."""
    small = tmpfs("tiny", f"size={checkpoint_bytes // 2}")
    proc = run(command(quickstart_data, tmp_path / "run", f"checkpoint.dir={small}"))
    error = one_line_error(proc)
    assert "free but a checkpoint of this run takes about" in error and str(small) in error, error
    assert "step 1/" not in proc.stdout
    assert not list(small.iterdir())  # the refused run removed even its lock file


def test_a_full_disk_at_a_later_save_stops_the_run_and_keeps_the_last_checkpoint(
    quickstart_data, checkpoint_bytes, tmp_path, tmpfs
):
    """Room for one checkpoint (the check before the first step passes) but not for two: the second save fails
    with ENOSPC (the first is pruned only after a newer one commits). One line, exit 2, the first checkpoint
    intact and latest, no partial folder, and a resume after freeing space goes on from it."""
    small = tmpfs("small", f"size={int(checkpoint_bytes * 1.5)}")
    cmd = command(quickstart_data, tmp_path / "run", f"checkpoint.dir={small}", "checkpoint.keep_last=1")
    error = one_line_error(run(cmd))
    assert "saving the checkpoint of step 4" in error and "No space left on device" in error, error
    assert "step_00000002 is intact and still the latest" in error
    assert [f.step for f in list_checkpoints(small)] == [2] and newest_complete(small).step == 2
    assert not list(small.glob(".tmp-*"))


def test_a_failed_save_is_one_line_and_leaves_the_previous_checkpoint_current(quickstart_data, tmp_path) -> None:
    """The same on any machine: the save of step 4 fails with ENOSPC injected where its shards are on disk."""
    proc = run(command(quickstart_data, tmp_path), env={**ENV, ENV_VAR: "save.written@4:ENOSPC"})
    error = one_line_error(proc)
    assert "saving the checkpoint of step 4" in error and "No space left on device" in error
    assert "step_00000002 is intact and still the latest" in error
    root = tmp_path / "checkpoints"
    assert [f.step for f in list_checkpoints(root)] == [2] and (root / "latest").read_text().strip() == "step_00000002"
    assert not list(root.glob(".tmp-*"))
    resumed = run(command(quickstart_data, tmp_path))  # the disk has room again
    assert resumed.returncode == 0 and "step_00000002" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]


def test_resume_on_data_of_another_tokenizer_is_refused(quickstart_data: Path, tmp_path: Path) -> None:
    """Data with the same windows but made with another tokenizer of equal vocabulary: refused, unless asked for."""
    from megatron_pept.data.corpus import generate_stories
    from megatron_pept.data.tokenizer import train_sentencepiece

    proc = run(command(quickstart_data, tmp_path / "run", "train.steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = tmp_path / "other"
    shutil.copytree(quickstart_data, other)
    index = json.loads((other / "index.json").read_text())
    vocab = index["vocab_size"]
    texts = generate_stories(6000, seed=99)  # other text, and the earlier normalisation: another tokenizer
    tok = train_sentencepiece(texts, output_dir=tmp_path / "tok", vocab_size=vocab, normalization="nfkc")
    assert tok.vocab_size == vocab and tok.sha256 != index["tokenizer"]["sha256"]
    shutil.copyfile(tok.path, other / "tokenizer.model")
    index["tokenizer"]["sha256"] = tok.sha256
    (other / "index.json").write_text(json.dumps(index))
    cmd = command(other, tmp_path / "run", "train.steps=4")
    error = one_line_error(run(cmd))
    assert "made with tokenizer" in error and "data.allow_tokenizer_change=true" in error
    allowed = run([*cmd, "data.allow_tokenizer_change=true"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "data.allow_tokenizer_change" in allowed.stdout + allowed.stderr  # said so


@pytest.mark.parametrize(
    "override,message",
    [("model.num_heads=5", "not divisible by num_heads"), ("model.num_kv_heads=3", "multiple of num_kv_heads")],
)
def test_shape_mistakes_are_one_line(quickstart_data: Path, tmp_path: Path, override: str, message: str) -> None:
    assert message in one_line_error(run(command(quickstart_data, tmp_path, override)))
    assert not tmp_path.joinpath("config.yaml").exists()


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a symlink's target."""
    return {
        str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
        for p in sorted(folder.rglob("*"))
    }


def test_a_tokenizer_file_leading_out_of_the_data_folder_overwrites_nothing(quickstart_data, tmp_path) -> None:
    """index.json's tokenizer.file was joined to the checkpoint folder when the trainer copied the tokenizer in: a
    name with enough '..' overwrote a file outside the run with a file outside the data folder, at every save,
    and the run ended with exit 0. Now one line and exit 2 before anything is written."""
    data = tmp_path / "x" / "a" / "b" / "c" / "data"
    shutil.copytree(quickstart_data, data)
    (tmp_path / "x" / "sub").mkdir()
    (tmp_path / "x" / "sub" / "victim").write_text("what the data folder's author wrote")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "victim").write_text(
        "precious"
    )  # data/../../../../sub/victim from run/checkpoints/.tmp-*/tokenizer
    index = json.loads((data / "index.json").read_text())
    index["tokenizer"]["file"] = "../../../../sub/victim"
    (data / "index.json").write_text(json.dumps(index))
    before = tree(tmp_path)
    error = one_line_error(run(command(data, tmp_path / "run", "data.builtin=null", "checkpoint.interval=1")))
    assert "tokenizer.file '../../../../sub/victim' goes up out of the folder" in error, error
    assert tree(tmp_path) == before


def lowered_vocabulary(quickstart_data: Path, folder: Path) -> int:
    """A copy of the quickstart data whose index claims one id fewer than its shards hold; that largest id."""
    shutil.copytree(quickstart_data, folder)
    index = json.loads((folder / "index.json").read_text())
    dtype = index["dtype"]
    largest = max(
        int(np.fromfile(folder / s["file"], dtype=dtype).max())
        for split in index["splits"].values()
        for s in split["shards"]
    )
    index["vocab_size"] = largest
    (folder / "index.json").write_text(json.dumps(index))
    return largest


@pytest.mark.parametrize("case", ["index_list", "file_path_builtin", "file_path", "ids_past_vocab"])
def test_data_mistakes_are_one_line(quickstart_data: Path, tmp_path: Path, case: str) -> None:
    """Through the real entry point: an index.json that is a JSON list (was an AttributeError traceback), a
    data.path that is a file (a NotADirectoryError traceback with the quickstart config's built-in data), data
    whose ids do not fit the vocabulary (an IndexError at the first step): one line, exit 2, nothing written."""
    data, extra = tmp_path / "data", ["data.builtin=null"]
    if case == "index_list":
        data.mkdir()
        (data / "index.json").write_text("[1, 2]")
        expected = "holds a JSON list, not an object"
    elif case.startswith("file_path"):
        data.write_bytes(b"\0" * 64)
        expected = f"data path {data} is a file, not a folder"
        if case == "file_path_builtin":
            extra = []
    else:
        largest = lowered_vocabulary(quickstart_data, data)
        expected = f"{data} holds token id {largest} but its index.json records a vocabulary of {largest} ids"
    before = tree(tmp_path)
    proc = run(command(data, tmp_path / "run", *extra))
    assert expected in one_line_error(proc), proc.stderr
    assert "step 1/" not in proc.stdout
    assert tree(tmp_path) == before
