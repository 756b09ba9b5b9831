"""Resumes that refuse what they cannot continue (issue 25, items 3, 4 and 6): another method or a setting that
shapes the saved state is one line before anything is loaded or written; a run resumes and prunes only its own
checkpoints in a checkpoint.dir shared with another run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import tiny

from megatron_pept.checkpoint import list_checkpoints, store
from megatron_pept.checkpoint.resume import RUN_FILE
from megatron_pept.errors import UserError
from megatron_pept.methods import METHODS
from megatron_pept.trainer import Trainer

BASE = ["train.eval_interval=0", "train.eval_at_start=false", "method.rank=4", "method.update_proj_gap=3"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock files' (each run writes its holder's details into them)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".megatron_pept.lock"
    }


@pytest.fixture(scope="module")
def galore_run(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("galore") / "run"
    with Trainer(
        tiny(quickstart_data, run_dir, *BASE, "train.steps=2", "checkpoint.interval=2", "method.name=galore")
    ) as t:
        t.train()
    return run_dir


@pytest.mark.parametrize(
    "change,named",
    [
        (["method.name=galore", "method.rank=8"], "method.rank=4 (this run: 8)"),  # item 3: silently ran at rank 4
        (["method.name=galore_ef"], "method.name=galore (this run: method.name=galore_ef)"),  # KeyError ef_residual
        (["method.name=full"], "method.name=galore (this run: method.name=full)"),  # size mismatch in the step
        (["method.name=adam_mini"], "method.name=galore (this run: method.name=adam_mini)"),  # KeyError 'm'
        (["method.name=galore_8bit"], "method.name=galore (this run: method.name=galore_8bit)"),  # ran on fp32 moments
        (["method.name=galore", "method.target_modules=[q_proj]"], "method.target_modules="),
        (["method.name=galore", "optim.state_dtype=bf16"], "optim.state_dtype='fp32' (this run: 'bf16')"),
    ],
)
def test_a_resume_that_cannot_continue_is_refused_before_anything_is_written(
    change: list[str], named: str, galore_run: Path, quickstart_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(galore_run, run_dir)
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="was saved with") as err:
        Trainer(tiny(quickstart_data, run_dir, *BASE, "train.steps=4", "checkpoint.interval=2", *change))
    message = str(err.value)
    assert named in message and "\n" not in message, message
    assert "model.init_from" in message  # how to carry the weights into another method
    assert snapshot(run_dir) == before  # config.yaml not rewritten, nothing saved


def test_galore_continues_as_galore_dynamic(galore_run: Path, quickstart_data: Path, tmp_path: Path) -> None:
    """A documented change that can continue: the same state under another refresh schedule. Its first step
    equals the one the uninterrupted galore run takes (the dynamic schedule does not refresh at step 2)."""
    extra = [*BASE, "train.steps=3", "checkpoint.interval=2"]
    whole = tmp_path / "whole"
    shutil.copytree(galore_run, whole)
    with Trainer(tiny(quickstart_data, whole, *extra, "method.name=galore")) as t:
        expected = t.train().train_losses
    switched = tmp_path / "switched"
    shutil.copytree(galore_run, switched)
    with Trainer(tiny(quickstart_data, switched, *extra, "method.name=galore_dynamic", "method.dynamic_first=5")) as t:
        assert t.train().train_losses == expected


def test_every_resume_key_is_a_setting_the_method_reads() -> None:
    for name, cls in METHODS.items():
        assert set(cls.resume_keys) <= set(cls.config_keys), name
        for other in cls.resumes_from:
            assert other in METHODS and name in METHODS[other].resumes_from, (name, other)  # both ways


# -- two run folders, one checkpoint.dir (item 6) ------------------------------------------------------------------


def run_in(shared: Path, run_dir: Path, data: Path, steps: int, *extra: str) -> Trainer:
    return Trainer(
        tiny(
            data,
            run_dir,
            *BASE,
            f"train.steps={steps}",
            "checkpoint.interval=2",
            "checkpoint.keep_last=1",
            f"checkpoint.dir={shared}",
            *extra,
        )
    )


def test_runs_sharing_a_checkpoint_dir_keep_to_their_own(quickstart_data: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    first, second = tmp_path / "first", tmp_path / "second"
    with run_in(shared, first, quickstart_data, 2) as t:
        t.train()
    first_id = json.loads((first / RUN_FILE).read_text())["run_id"]
    meta = json.loads((shared / "step_00000002" / store.META).read_text())
    assert meta["run"] == {"id": first_id, "run_dir": str(first.absolute())}
    before = snapshot(shared)

    # A second run folder does not pick up the first's checkpoints by itself (it used to resume them silently).
    with pytest.raises(UserError, match="holds checkpoints of another run .* none of this one") as err:
        run_in(shared, second, quickstart_data, 4)
    assert str(first) in str(err.value) and "checkpoint.resume=PATH" in str(err.value)
    assert snapshot(shared) == before and not second.exists()

    # Named explicitly, it resumes (and says so); retention (keep_last=1) prunes its own checkpoints only.
    with run_in(shared, second, quickstart_data, 6, f"checkpoint.resume={shared / 'step_00000002'}") as t:
        assert t.state.step == 2
        t.train()
    steps = sorted(f.step for f in list_checkpoints(shared))
    assert steps == [2, 6], steps  # the first run's step 2 kept; the second's step 4 pruned after its step 6
    assert json.loads((second / RUN_FILE).read_text())["run_id"] != first_id
    assert snapshot(shared)["step_00000002/meta.json"] == before["step_00000002/meta.json"]

    # The first run, restarted, would replace the second's step 6 with its own: refused (it used to resume from
    # the second run's newest checkpoint).
    with pytest.raises(UserError, match="step_00000006, a checkpoint of another run .* would replace"):
        run_in(shared, first, quickstart_data, 8)


def test_a_run_folder_that_lost_run_json_adopts_its_own_checkpoints(quickstart_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = [*BASE, "train.steps=2", "checkpoint.interval=2"]
    with Trainer(tiny(quickstart_data, run_dir, *extra)) as t:
        t.train()
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    (run_dir / RUN_FILE).unlink()
    with Trainer(tiny(quickstart_data, run_dir, *BASE, "train.steps=4", "checkpoint.interval=2")) as t:
        assert t.state.step == 2
        t.train()
    assert json.loads((run_dir / RUN_FILE).read_text())["run_id"] == run_id
    (run_dir / RUN_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{RUN_FILE} is damaged"):
        Trainer(tiny(quickstart_data, run_dir, *BASE, "train.steps=6", "checkpoint.interval=2"))


def test_checkpoints_of_earlier_versions_count_as_the_runs_own(quickstart_data: Path, tmp_path: Path) -> None:
    """Checkpoints that record no run (written before run ids existed) resume as before."""
    run_dir = tmp_path / "run"
    with Trainer(tiny(quickstart_data, run_dir, *BASE, "train.steps=2", "checkpoint.interval=2")) as t:
        t.train()
        weights = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    meta = json.loads((checkpoint / store.META).read_text())
    del meta["run"]
    (checkpoint / store.META).write_text(json.dumps(meta))
    (checkpoint / store.MARKER).unlink()
    store.write_marker(checkpoint)
    (run_dir / RUN_FILE).unlink()
    with Trainer(tiny(quickstart_data, run_dir, *BASE, "train.steps=4", "checkpoint.interval=2")) as t:
        assert t.state.step == 2
        for key, value in t.raw_model.state_dict().items():
            assert torch.equal(value, weights[key]), key


def test_a_run_dir_without_checkpoints_is_named_as_such(quickstart_data: Path, tmp_path: Path) -> None:
    """checkpoint.resume naming a run whose checkpoints were deleted: 'holds no checkpoint', not 'interrupted'."""
    run_dir = tmp_path / "run"
    with Trainer(tiny(quickstart_data, run_dir, *BASE, "train.steps=2", "checkpoint.interval=2")) as t:
        t.train()
    shutil.rmtree(run_dir / "checkpoints")
    for target in (run_dir, run_dir / "checkpoints"):
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="holds no checkpoint") as err:
            Trainer(tiny(quickstart_data, tmp_path / "new", *BASE, f"checkpoint.resume={target}"))
        assert "interrupted" not in str(err.value)
