"""tools/study.py: the table for full, relora, galore and galore_dynamic_ef on CPU (learning rate chosen by the
grid, bits per byte, trainable parameters, a memory split that adds up to the allocator's peak), and a study
killed in the middle of a run resumes it without redoing the finished ones."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE
from megatron_pept.study.runner import bits_per_byte, run_study
from megatron_pept.study.spec import StudyError, load_spec

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
LOWRANK = ["method.rank=8", "method.warm_start_steps=2", "method.reset_every=2", "method.restart_warmup_steps=1"]
GALORE = ["method.rank=8", "method.update_proj_gap=2"]


def write_spec(folder: Path, data: Path, methods: list[dict]) -> Path:
    spec = {
        "config": str(REPO / "configs" / "quickstart.yaml"),
        "overrides": [
            f"data.path={data}",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.eval_interval=3",
            "train.eval_batches=2",
            "train.log_interval=1",
            "optim.warmup_steps=1",
        ],
        "steps": STEPS,
        "checkpoint_interval": 2,
        "probe_steps": 4,
        "methods": methods,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


METHODS = [
    {"name": "full", "lrs": [1.0e-4, 3.0e-3]},
    {"name": "relora", "lrs": [3.0e-3], "overrides": LOWRANK, "probe_overrides": ["method.warm_start_steps=0"]},
    # grid_steps == steps here: the grid run is the final run, grid_overrides included, and so are its seed runs
    {
        "name": "galore",
        "lrs": [3.0e-3],
        "overrides": GALORE,
        "grid_overrides": ["method.update_proj_gap=3"],
        "seeds": [1],
    },
    {
        "name": "galore_dynamic_ef",
        "lrs": [3.0e-3],
        "overrides": [*GALORE, "method.dynamic_first=2", "method.dynamic_cap=4"],
    },
]


@pytest.fixture(scope="module")
def study(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("study")
    spec = load_spec(write_spec(folder, quickstart_data, METHODS))
    return run_study(spec, folder / "out"), folder / "out"


def test_table_for_the_four_methods(study: tuple[dict, Path]) -> None:
    result, out = study
    rows = result["methods"]
    assert list(rows) == ["full", "relora", "galore", "galore_dynamic_ef"]
    # the grid decides: full's best lr is the one with the lower validation loss (1e-4 learns far less in 6 steps)
    grid = rows["full"]["grid"]
    assert grid["0.0001"] > grid["0.003"]
    assert rows["full"]["best_lr"] == 3.0e-3 and rows["full"]["best_lr_at_grid_edge"]
    for label, row in rows.items():
        final = row["final"]
        assert final["steps"] == STEPS and final["tokens_seen"] == STEPS * 8 * 128
        assert math.isfinite(final["val_loss"]) and final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
        assert final["bits_per_byte"] == pytest.approx(
            final["val_loss"] * final["val_tokens"] / (math.log(2) * final["val_bytes"])
        )
        assert final["val_tokens"] == 2 * 4 * 128  # eval_batches x micro_batch x seq_len targets
        assert final["tokens_per_sec"] > 0
        assert (out / "grid" / label).is_dir(), label
    # low-rank training (after its warm start) trains fewer parameters than full; GaLore trains them all
    assert rows["relora"]["final"]["trainable_params"] < rows["full"]["final"]["trainable_params"]
    assert rows["galore"]["final"]["trainable_params"] == rows["full"]["final"]["trainable_params"]
    table = (out / "study.md").read_text()
    for label in rows:
        assert f"| {label} |" in table
    assert "| full | 1.00x | 1.00x | 1.00x |" in table
    assert json.loads((out / "study.json").read_text())["methods"].keys() == rows.keys()


def test_seeds_repeat_the_final_run_at_the_best_lr(study: tuple[dict, Path]) -> None:
    result, out = study
    rows = result["methods"]
    assert [label for label, row in rows.items() if "seeds" in row] == ["galore"]
    seeds = rows["galore"]["seeds"]
    assert seeds["val_loss"]["0"] == rows["galore"]["final"]["val_loss"]  # the spec's own seed is the final run
    run = out / "final" / "galore_seed1"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["seed"] == 1 and config["optim"]["lr"] == 3.0e-3 and config["method"]["rank"] == 8
    assert config["method"]["update_proj_gap"] == 3
    again = json.loads((run / "result.json").read_text())
    assert again["steps"] == STEPS and seeds["val_loss"]["1"] == again["val_loss"]
    assert again["val_loss"] != seeds["val_loss"]["0"]  # another initialisation and data order
    losses = [seeds["val_loss"]["0"], seeds["val_loss"]["1"]]
    assert seeds["mean"] == pytest.approx(sum(losses) / 2)
    assert seeds["stdev"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    assert not (out / "grid" / "galore_seed1").exists()  # no grid of its own
    row = f"| galore | 0.003 | {losses[0]:.4f} | {losses[1]:.4f} | {seeds['mean']:.4f} | {seeds['stdev']:.4f} |"
    assert row in (out / "study.md").read_text()


def test_memory_split_adds_up_to_the_measured_peak(study: tuple[dict, Path]) -> None:
    rows = study[0]["methods"]
    for label, row in rows.items():
        memory = row["probe"]
        parts = sum(memory[k] for k in ("weights", "gradients", "optimizer", "activations", "other"))
        assert parts == memory["tracked_peak"]
        assert abs(memory["tracked_peak"] - memory["measured_peak"]) <= 0.10 * memory["measured_peak"], label
        assert memory["activations"] > 0 and memory["weights"] > 0, label
    full, relora, galore = rows["full"]["probe"], rows["relora"]["probe"], rows["galore"]["probe"]
    params = rows["full"]["final"]["params"]
    # full AdamW: fp32 weights, one fp32 gradient per weight, two fp32 moments per weight (plus step counters);
    # with 2 micro-batches the first one's gradients are alive at the peak (the second's forward); while the
    # second backward accumulates, a layer's incoming gradient exists beside its accumulated one
    assert full["weights"] >= 4 * params and full["gradients"] == 4 * params
    assert 4 * params <= full["max_gradients"] < 8 * params
    assert 8 * params <= full["optimizer"] < 8 * params + 4096  # (the step's temporaries count in max_optimizer)
    for memory in rows.values():
        for part in ("weights", "gradients", "optimizer", "activations"):
            assert memory["probe"][f"max_{part}"] >= memory["probe"][part]
    # GaLore keeps projected moments (and projectors): less optimizer state than AdamW; ReLoRA trains adapters only
    assert galore["max_optimizer"] < full["max_optimizer"]
    assert relora["max_gradients"] < full["max_gradients"] and relora["max_optimizer"] < full["max_optimizer"]


def test_bits_per_byte_is_loss_in_bits_over_bytes() -> None:
    assert bits_per_byte(math.log(2), target_tokens=100, target_bytes=400) == pytest.approx(0.25)


def test_spec_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"config": "quickstart", "steps": 4, "grid_steps": 8, "methods": []}))
    with pytest.raises(StudyError, match="grid_steps .8. is larger than steps"):
        load_spec(bad)
    bad.write_text(yaml.safe_dump({"config": "quickstart", "steps": 4, "methods": [{"name": "full", "lrs": []}]}))
    with pytest.raises(StudyError, match="lrs must be a non-empty list"):
        load_spec(bad)
    bad.write_text(yaml.safe_dump({"config": "quickstart", "steps": 4, "methods": [{"name": "lora", "lrs": [1]}]}))
    with pytest.raises(StudyError, match="baseline 'full' is not one of the methods"):
        load_spec(bad)
    for seeds in ([1, 1], [-1], "1", [1.5]):
        bad.write_text(
            yaml.safe_dump(
                {"config": "quickstart", "steps": 4, "methods": [{"name": "full", "lrs": [1], "seeds": seeds}]}
            )
        )
        with pytest.raises(StudyError, match=r"methods\[0\].seeds must be a list of distinct integers"):
            load_spec(bad)
    twice = [{"name": "full", "lrs": [1], "seeds": [2]}, {"name": "full", "label": "full_seed2", "lrs": [1]}]
    bad.write_text(yaml.safe_dump({"config": "quickstart", "steps": 4, "methods": twice}))
    with pytest.raises(StudyError, match="label full_seed2 is also the folder of full's seed run"):
        load_spec(bad)
    # the spec's own seed (train.seed, 3 here) is the final run already: refused before anything trains
    bad.write_text(
        yaml.safe_dump(
            {
                "config": "quickstart",
                "overrides": ["train.seed=3"],
                "steps": 4,
                "methods": [{"name": "full", "lrs": [1], "seeds": [1, 3]}],
            }
        )
    )
    with pytest.raises(StudyError, match="full: seeds lists 3, the seed of its final run already"):
        run_study(load_spec(bad), tmp_path / "out")
    assert not (tmp_path / "out" / "grid").exists()
    code = subprocess.run(
        [sys.executable, "tools/study.py", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert code.returncode == 2 and code.stderr.count("\n") == 1 and "no study spec" in code.stderr


def test_killed_study_resumes_without_redoing_finished_runs(quickstart_data: Path, tmp_path: Path) -> None:
    methods = [{"name": "full", "lrs": [3.0e-3]}, {"name": "galore", "lrs": [3.0e-3], "overrides": GALORE}]
    spec_path = write_spec(tmp_path, quickstart_data, methods)
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/study.py", str(spec_path), "--output", str(out)]
    first = subprocess.run([*cmd, "--only", "full"], cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    # galore has not run: no row for it, and a line that says so
    assert set(json.loads((out / "study.json").read_text())["methods"]) == {"full"}
    assert "galore: not in the tables, galore lr 0.003 (grid run of 6 steps) has not finished" in first.stdout
    done = out / "grid" / "full" / "lr0.003" / "result.json"
    stamp = done.stat().st_mtime_ns, done.read_bytes()
    # freeze the whole study at galore's step 3 (after its step-2 checkpoint): full is done, so it is not rerun
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, ENV_VAR: "step.end@3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if FAULT_FROZEN_LINE in line:
            break
    else:
        pytest.fail(f"the study ended (exit {proc.wait()}) before the fault point:\n{''.join(lines[-30:])}")
    assert any("full lr 0.003 (grid run of 6 steps): finished before, kept" in x for x in lines)
    assert not any("full lr 0.003 (grid run of 6 steps): training" in x for x in lines), "a finished run was redone"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    galore_result = out / "grid" / "galore" / "lr0.003" / "result.json"
    assert not galore_result.exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (done.stat().st_mtime_ns, done.read_bytes()) == stamp
    resumed = json.loads(galore_result.read_text())
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith("step_00000002")
    assert resumed["steps"] == STEPS
    assert set(json.loads((out / "study.json").read_text())["methods"]) == {"full", "galore"}
    # --only one method of a finished study trains nothing and writes the whole study's tables, byte for byte
    tables = {name: (out / name).read_bytes() for name in ("study.json", "study.md")}
    only = subprocess.run([*cmd, "--only", "galore"], cwd=REPO, capture_output=True, text=True)
    assert only.returncode == 0, only.stderr[-2000:]
    assert (
        ": training in" not in only.stdout and "galore lr 0.003 (grid run of 6 steps): finished before" in only.stdout
    )
    assert {name: (out / name).read_bytes() for name in tables} == tables


def test_a_final_run_at_another_lr_is_set_aside(tmp_path: Path) -> None:
    from megatron_pept.study.runner import set_aside_if_stale

    run = tmp_path / "final" / "galore"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.008}}))
    set_aside_if_stale(run, 0.008, tmp_path / "stale")  # same lr: kept, to be resumed or reused
    assert run.is_dir()
    set_aside_if_stale(run, 0.016, tmp_path / "stale")  # the extended grid's best is another lr
    assert not run.exists() and (tmp_path / "stale" / "galore-lr0.008" / "config.yaml").is_file()


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "full", "label": "../x"},
        {"name": "full", "label": "/tmp/x"},
        {"name": "full", "label": "a/b"},
        {"name": "full", "label": ".."},
        {"name": "../../x"},  # the name is the label when there is none
    ],
)
def test_a_label_is_a_folder_name_inside_the_output(entry: dict, tmp_path: Path) -> None:
    """A method's label names its run folders under --output (grid/<label>/..., final/<label>, probes/<label>.json):
    one that would lead out of it is refused in one line before anything is written."""
    spec = tmp_path / "spec.yaml"
    methods = [{"name": "full", "label": "full", "lrs": [1e-3]}, {**entry, "lrs": [1e-3]}]
    spec.write_text(yaml.safe_dump({"config": "quickstart", "steps": 2, "methods": methods}))
    proc = subprocess.run(
        [sys.executable, "tools/study.py", str(spec), "--output", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "must be letters, digits, - and _ (a folder name)" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
