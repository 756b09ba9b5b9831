"""Checkpoint folders: the completion marker must list every file (a malformed one means "skip", never a crash),
temporary folders belong to the run that wrote them, and the run lock keeps a second job out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pept.checkpoint import store
from megatron_pept.checkpoint.lock import LOCK_FILE, FolderLock
from megatron_pept.errors import UserError


def make_checkpoint(root: Path, step: int) -> Path:
    folder = root / store.step_dir_name(step)
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "0.distcp").write_bytes(os.urandom(1000))
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    store.write_marker(folder)
    return folder


@pytest.mark.parametrize(
    "marker,reason",
    [
        ({"files": {}}, "does not list"),  # would otherwise verify an empty promise
        ([], "malformed"),
        ({"files": []}, "malformed"),
        ("complete", "malformed"),
        ({"files": {"meta.json": {"bytes": 12}}}, "malformed"),  # no checksum
        ({"other": 1}, "malformed"),
    ],
)
def test_a_malformed_marker_means_skip_this_checkpoint(tmp_path: Path, marker, reason: str) -> None:
    make_checkpoint(tmp_path, 1)
    bad = make_checkpoint(tmp_path, 2)
    (bad / store.MARKER).write_text(json.dumps(marker))
    problem = store.verify(bad)
    assert problem is not None and reason in problem
    found = store.newest_complete(tmp_path)
    assert found is not None and found.step == 1  # skipped, not a crash


def test_the_marker_must_list_every_file(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 1)
    assert store.verify(folder) is None
    (folder / "state" / "1.distcp").write_bytes(b"added after the marker")
    assert "does not list state/1.distcp" in store.verify(folder)


def test_clean_temporary_removes_only_other_runs_leftovers_and_restores_a_replaced_checkpoint(tmp_path: Path) -> None:
    ours = tmp_path / store.tmp_dir_name(3, run_id="ours")
    theirs = tmp_path / store.tmp_dir_name(3, run_id="theirs")
    legacy = tmp_path / ".tmp-step_00000004"  # written by an earlier version
    for folder in (ours, theirs, legacy):
        folder.mkdir()
    # A crash while step 2 was being replaced: the old one renamed aside, the new one never renamed into place.
    old = make_checkpoint(tmp_path, 2)
    old.rename(tmp_path / ".old-step_00000002.theirs")
    store.clean_temporary(tmp_path, keep_run_id="ours")
    assert ours.is_dir() and not theirs.exists() and not legacy.exists()
    assert store.verify(tmp_path / "step_00000002") is None  # put back, intact


def test_commit_replaces_a_step_only_once_the_new_one_is_complete(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 5)
    tmp = tmp_path / store.tmp_dir_name(5, run_id="r")
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "0.distcp").write_bytes(b"new")
    store.commit(tmp_path, tmp, 5, run_id="r")
    assert (tmp_path / "step_00000005" / "state" / "0.distcp").read_bytes() == b"new"
    assert store.read_latest(tmp_path) == "step_00000005" and not list(tmp_path.glob(".old-*"))


HOLD = """
import sys, time
from pathlib import Path
from megatron_pept.checkpoint.lock import FolderLock
lock = FolderLock([Path(sys.argv[1])], run_id="holder")
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin or kills us
"""


@pytest.mark.slow  # a process
def test_a_second_run_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # it holds the lock now (observed, not waited for)
        second = FolderLock([tmp_path], run_id="second")
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} on .*run holder"):
            second.acquire()
        assert (tmp_path / LOCK_FILE).is_file()  # the refused one removed nothing of the holder's
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    again = FolderLock([tmp_path], run_id="after")
    again.acquire()  # at once: no stale lock
    again.release()


def test_a_refused_lock_leaves_no_folder_behind(tmp_path: Path) -> None:
    held = FolderLock([tmp_path / "a"], run_id="one")
    held.acquire()
    later = FolderLock([tmp_path / "new" / "run", tmp_path / "a"], run_id="two")
    with pytest.raises(UserError, match="in use"):
        later.acquire()
    assert not (tmp_path / "new").exists()  # created while acquiring, removed when refused
    held.release()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create"):
        FolderLock([blocked / "run"], run_id="three").acquire()


@pytest.mark.parametrize("name", ["../outside.txt", "{absolute}", "state/../../outside.txt"])
def test_a_marker_naming_a_file_outside_the_checkpoint_is_refused(tmp_path: Path, name: str) -> None:
    """COMPLETE.json's names are read (checked, hashed) only inside the checkpoint folder (issue 25, item 2)."""
    folder = make_checkpoint(tmp_path / "root", 1)
    (tmp_path / "root" / "outside.txt").write_text("x")
    name = name.format(absolute=tmp_path / "root" / "outside.txt")  # a file that exists, named by its full path
    marker = json.loads((folder / store.MARKER).read_text())
    marker["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (folder / store.MARKER).write_text(json.dumps(marker))
    assert "is an absolute path" in store.verify(folder) or "goes up out of the folder" in store.verify(folder)


def test_a_symbolic_link_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """A link inside the folder would make verification and loading read a file elsewhere."""
    folder = make_checkpoint(tmp_path / "root", 1)
    outside = tmp_path / "secret"
    outside.write_text("not a checkpoint file")
    (folder / "extra").symlink_to(outside)
    store.write_marker(folder)  # a marker listing it, as a tamperer would write it
    assert "is a symbolic link" in store.verify(folder)


def test_inside_keeps_names_in_their_folder(tmp_path: Path) -> None:
    from megatron_pept.safe_paths import inside

    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path.parent)
    assert inside(tmp_path, "sub/a.bin", source="index.json") == tmp_path / "sub" / "a.bin"
    for name, reason in [
        ("../a", "goes up out of the folder"),
        ("/abs", "is an absolute path"),
        ("sub/../../a", "goes up out of the folder"),
        ("link/a", "is a symlink that leads out of the folder"),
        ("", "not a file name"),
        (None, "not a file name"),
    ]:
        with pytest.raises(UserError, match=reason):
            inside(tmp_path, name, source="index.json")


def test_a_list_override_with_broken_yaml_is_one_line() -> None:
    from megatron_pept.errors import ConfigError
    from megatron_pept.registry import load_config

    with pytest.raises(ConfigError, match="config key 'method.target_modules' is not valid YAML"):
        load_config(None, ["data.path=x", "method.name=relora", "method.target_modules=[q_proj"])
    with pytest.raises(ConfigError, match="config key 'optim.betas' is not valid YAML"):
        load_config(None, ["data.path=x", "optim.betas=[0.9"])
