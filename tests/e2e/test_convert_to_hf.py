"""tools/convert_to_hf.py through its command line: where it writes and what it refuses. It writes in a folder of
its own and never removes one it did not make; a filled --output needs --overwrite; a link or a file as --output,
a read-only or full disk and a file size limit are one line on stderr with exit code 2, and nothing is left
behind. The read-only and full disks are mounts in a private mount namespace (skipped where unshare may not make
one); the file size limit (RLIMIT_FSIZE) works for any user."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch import run, small_run
from megatron_pept.config import load_config
from megatron_pept.trainer import Trainer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dir(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("convert") / "run"
    Trainer(load_config(None, small_run(quickstart_data, folder, "train.steps=2", "checkpoint.interval=2"))).train()
    return folder


def convert(checkpoint: Path, output: Path, *extra: str, prefix: tuple[str, ...] = (), **kwargs):
    cmd = [*prefix, sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(checkpoint), "--output", str(output)]
    return run([*cmd, *extra], **kwargs)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_folder_beside_the_output_survives_and_a_filled_output_needs_overwrite(run_dir, tmp_path) -> None:
    """.NAME.tmp was the export's fixed work folder, deleted before each export whoever had made it."""
    mine = tmp_path / ".out.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    first = convert(run_dir, out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert files(mine) == {"notes.txt": b"mine"} and "notes.txt" not in files(out)
    exported = files(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported.keys()

    (out / "extra.txt").write_text("added by hand")
    refused = one_line_error(convert(run_dir, out))
    assert f"{out} exists and is not empty; choose a new folder, or give --overwrite to replace it" in refused
    assert files(out) == {**exported, "extra.txt": b"added by hand"}

    replaced = convert(run_dir, out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert files(out).keys() == exported.keys() and files(mine) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp", "out"]  # no work folder left


def test_a_link_or_a_file_as_output_is_one_line_and_changes_nothing(run_dir, tmp_path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "link-to-folder").symlink_to(tmp_path / "folder")
    (tmp_path / "link-to-file").symlink_to(tmp_path / "file.txt")
    for name, says in (
        ("link-to-folder", "is a symbolic link"),
        ("link-to-file", "is a symbolic link"),
        ("file.txt", "is a file, not a folder"),
    ):
        error = one_line_error(convert(run_dir, tmp_path / name))
        assert f"--output {tmp_path / name} {says}" in error, error
    assert files(tmp_path) == {"file.txt": b"mine", "link-to-file": b"mine"} and not list(
        (tmp_path / "folder").iterdir()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder", "link-to-file", "link-to-folder"]


# In a mount namespace of its own: mount "$0" read-only (a bind of itself) or as a small tmpfs, run "$@", then
# list what is left in "$0" (on stdout, where the tool writes nothing when it fails; the tmpfs is gone after).
IN_NAMESPACE = '{mount} || exit 97; "$@"; rc=$?; find "$0" -mindepth 1 -printf "left: %P\\n"; exit $rc'
MOUNTS = {
    "read-only": 'mount --bind "$0" "$0" && mount -o bind,remount,ro "$0"',
    "full": 'mount -t tmpfs -o size=128k tmpfs "$0"',
}


@pytest.mark.parametrize("disk", ["read-only", "full", "ulimit-f"])
def test_a_read_only_or_full_disk_is_one_line_and_leaves_nothing(disk: str, run_dir, tmp_path) -> None:
    """A read-only disk is found before the checkpoint is read (the tool's work folder cannot be made), so its line
    is the only one; a full disk or a file size limit only when the weights are written, after the libraries the
    export loads have printed their own notices, so there the error is the last line and no traceback."""
    where = tmp_path / "disk"
    where.mkdir()
    output = where / "made" / "hf"  # a parent folder the export makes, and must remove again
    if disk == "ulimit-f":

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # model.safetensors is about 900 kB
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing

        proc = convert(run_dir, output, preexec_fn=limit)
        left = [p.name for p in where.iterdir()]
    else:
        if shutil.which("unshare") is None:
            pytest.skip("no unshare here to mount a disk in a namespace of its own")
        namespace = ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-rm"]
        script = IN_NAMESPACE.format(mount=MOUNTS[disk])
        proc = convert(run_dir, output, prefix=(*namespace, "sh", "-c", script, str(where)))
        if proc.returncode == 97 or proc.stderr.startswith("unshare:"):
            pytest.skip(f"cannot mount in a namespace of its own here: {proc.stderr.strip()[:200]}")
        left = [line for line in proc.stdout.splitlines() if line.startswith("left: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = one_line_error(proc) if disk == "read-only" else proc.stderr.strip().splitlines()[-1]
    reason = {"read-only": "Read-only file system", "full": "No space left on device", "ulimit-f": "ulimit -f"}[disk]
    assert error.startswith(f"convert_to_hf.py: error: cannot write the export to {output}: "), error
    assert reason in error and "nothing was left behind" in error, error
    assert left == [] and not list(where.iterdir()), (left, proc.stdout)
