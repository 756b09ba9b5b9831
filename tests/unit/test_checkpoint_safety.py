"""Nothing in a checkpoint runs code when it is read (issue 25, item 1): DCP's ``.metadata`` is unpickled by a
restricted unpickler (megatron_pept.checkpoint.safe_dcp) on every path that opens a checkpoint (resume, HF
export, update-rank analysis); damaged state and RNG files are one line each."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from poisoned import Command, poison
from test_trainer import tiny

from launch import run, train_command
from megatron_pept.checkpoint import safe_dcp, store
from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.errors import UserError
from megatron_pept.trainer import Trainer


@pytest.fixture(scope="module")
def saved_run(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run with a checkpoint at step 2 (relora: the export merges adapters, method state)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    extra = ["train.steps=2", "checkpoint.interval=2", "method.name=relora", "method.rank=4", "method.reset_every=4"]
    with Trainer(tiny(quickstart_data, run_dir, *extra)) as trainer:
        trainer.train()
    return run_dir


def copy_run(saved_run: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the saved run and its checkpoint folder (tests tamper with the copy)."""
    shutil.copytree(saved_run, dest)
    return dest, dest / "checkpoints" / store.step_dir_name(2)


def test_poisoned_metadata_really_runs_code_with_plain_pickle(saved_run: Path, tmp_path: Path) -> None:
    """The payload the tests below use does what it says when unpickled the way DCP does (so they can fail)."""
    _, checkpoint = copy_run(saved_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    poison(checkpoint, marker)
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / "state")).read_metadata()
    assert marker.exists() and len(metadata.state_dict_metadata) > 10


def test_poisoned_metadata_is_refused_by_every_reader(saved_run: Path, tmp_path: Path, quickstart_data: Path) -> None:
    run_dir, checkpoint = copy_run(saved_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    poison(checkpoint, marker)
    config_before = (run_dir / "config.yaml").read_bytes()
    # Resume (in process: the same code path as the CLI, whose one-line output is checked below).
    extra = ["train.steps=3", "checkpoint.interval=2", "method.name=relora", "method.rank=4", "method.reset_every=4"]
    with pytest.raises(UserError, match=r"\.metadata was refused: it refers to operator\.itemgetter"):
        Trainer(tiny(quickstart_data, run_dir, *extra))
    # Reading tensors for export or analysis.
    with pytest.raises(UserError, match="was refused"):
        load_full_tensors(checkpoint, prefix="model.")
    from megatron_pept.tools import analyze_rank, convert_to_hf

    assert convert_to_hf.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    assert analyze_rank.main([f"init:{run_dir}", str(checkpoint), "--output", str(tmp_path / "rank")]) == 2
    assert not marker.exists()
    assert (run_dir / "config.yaml").read_bytes() == config_before


@pytest.mark.slow  # a training process
def test_poisoned_metadata_through_the_cli_is_one_line(saved_run: Path, tmp_path: Path, quickstart_data: Path) -> None:
    run_dir, checkpoint = copy_run(saved_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    poison(checkpoint, marker)
    config = run_dir / "config.yaml"  # the saved run's resolved config: the same run, resumed in the copy
    proc = run(train_command(f"run_dir={run_dir}", "train.steps=3", config=str(config)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "was refused" in lines[0], proc.stderr[-3000:]
    assert not marker.exists()


def _write_metadata(checkpoint: Path, metadata: object) -> None:
    (checkpoint / "state" / safe_dcp.METADATA_FILE).write_bytes(pickle.dumps(metadata))


def test_metadata_that_rewrites_a_class_is_refused(saved_run: Path, tmp_path: Path) -> None:
    """A pickle may set attributes on the objects it builds (BUILD): on a class that would rewrite it for the whole
    process, so only instances of DCP's metadata classes may have their state set."""
    _, checkpoint = copy_run(saved_run, tmp_path / "run")
    real = (checkpoint / "state" / safe_dcp.METADATA_FILE).read_bytes()
    from torch.distributed.checkpoint.metadata import Metadata

    # GLOBAL Metadata, BUILD with (None, {'state_dict_metadata': 'x'}) (setattr on the class), POP; then the real
    # metadata.
    module, name = Metadata.__module__.encode(), Metadata.__name__.encode()
    crafted = b"\x80\x02c" + module + b"\n" + name + b"\nN}U\x13state_dict_metadataU\x01xs\x86b0" + real[2:]
    (checkpoint / "state" / safe_dcp.METADATA_FILE).write_bytes(crafted)
    with pytest.raises(UserError, match="sets the state of a type"):
        safe_dcp.read_metadata(checkpoint / "state")
    assert "state_dict_metadata" not in vars(Metadata)


def test_non_tensor_entries_and_outside_files_are_refused(saved_run: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _, checkpoint = copy_run(saved_run, tmp_path / "run")
    good = (checkpoint / "state" / safe_dcp.METADATA_FILE).read_bytes()
    # A bytes entry: DCP's planner would torch.load it with weights_only=False.
    bad = pickle.loads(good)
    bad.state_dict_metadata["extra.train.step"] = BytesStorageMetadata()
    _write_metadata(checkpoint, bad)
    with pytest.raises(UserError, match="declares extra.train.step as a BytesStorageMetadata"):
        safe_dcp.read_metadata(checkpoint / "state")
    # A data file outside the folder.
    outside = tmp_path / "outside.distcp"  # a file that exists, named by its absolute path
    shutil.copyfile(next((checkpoint / "state").glob("*.distcp")), outside)
    for path in ("../../rng/rank00000.pt", str(outside), "missing.distcp"):
        bad = pickle.loads(good)
        info = next(iter(bad.storage_data.values()))
        info.relative_path = path
        _write_metadata(checkpoint, bad)
        with pytest.raises(UserError, match="names the data file"):
            safe_dcp.read_metadata(checkpoint / "state")
    (checkpoint / "state" / safe_dcp.METADATA_FILE).write_bytes(good)
    assert len(safe_dcp.read_metadata(checkpoint / "state").state_dict_metadata) > 10


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_state_files_are_one_line(damage: str, saved_run: Path, tmp_path: Path, quickstart_data: Path) -> None:
    """A truncated or garbled .metadata, .distcp or RNG file, read without checksums (checkpoint.verify_checksums
    =false and the completion marker rewritten: what a damaged disk can also produce), is one UserError naming it."""
    extra = [
        "train.steps=3",
        "checkpoint.interval=2",
        "checkpoint.verify_checksums=false",
        "method.name=relora",
        "method.rank=4",
        "method.reset_every=4",
    ]
    for i, name in enumerate(("state/.metadata", "state/__0_0.distcp", "rng/rank00000.pt")):
        run_dir, checkpoint = copy_run(saved_run, tmp_path / f"run{i}")
        path = checkpoint / name
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes(data[:64] + bytes(255 - b for b in data[64:]))
        (checkpoint / store.MARKER).unlink()
        store.write_marker(checkpoint)
        with pytest.raises(UserError, match="damaged|cannot be read") as err:
            Trainer(tiny(quickstart_data, run_dir, *extra))
        assert len(str(err.value).splitlines()) == 1
        assert checkpoint.name in str(err.value), str(err.value)


def test_rng_files_load_tensors_only(saved_run: Path, tmp_path: Path) -> None:
    """The RNG file is read with weights_only=True: a pickled payload in it is refused, not run."""
    _, checkpoint = copy_run(saved_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    rng = checkpoint / "rng" / "rank00000.pt"
    torch.save({"cpu": torch.get_rng_state(), "x": Command(f"touch {marker}")}, rng)
    from megatron_pept.checkpoint.state import read_rng_state

    with pytest.raises(UserError, match="rank00000.pt cannot be read"):
        read_rng_state(rng)
    assert not marker.exists()
