"""The study tools on tiny real runs of the quickstart config: plot_runs (TensorBoard curves of several runs against
tokens) and analyze_rank (the rank of a weight update, ReLoRA Figures 3 and 4)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.checkpoint.store import step_dir_name
from megatron_pept.config import load_config
from megatron_pept.errors import UserError
from megatron_pept.study.plots import (
    last_value_per_step,
    moving_average,
    plot_runs,
    read_run,
    steps_to_tokens,
    tokens_per_step,
)
from megatron_pept.study.rank import (
    LAYER_ORDER,
    RankPair,
    analyze_rank,
    initial_model,
    initial_weights,
    load_dense,
    update_spectra,
)
from megatron_pept.tools.analyze_rank import main as rank_main
from megatron_pept.tools.plot_runs import main as plot_main
from megatron_pept.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STEPS, BATCH, SEQ, RANK, ALPHA = 6, 8, 32, 4, 8.0
RELORA = ["method.name=relora", f"method.rank={RANK}", f"method.alpha={ALPHA}", "method.reset_every=3"]
RELORA.append("method.restart_warmup_steps=1")
RELORA_TAGS = ["relora/adapter_norm", "relora/merged_update_norm", "relora/phase", "relora/pruned_fraction"]
RELORA_TAGS.append("relora/restarts")


def quick_cfg(data: Path, run_dir: Path, *overrides: str):
    """The quickstart config, shrunk: 6 steps of 8 x 32 tokens, validation every 3 steps, checkpoints at 3 and 6."""
    return load_config(
        QUICKSTART,
        [
            f"run_dir={run_dir}",
            f"data.path={data}",
            "data.builtin=null",
            f"data.seq_len={SEQ}",
            f"train.steps={STEPS}",
            f"train.global_batch_size={BATCH}",
            f"train.micro_batch_size={BATCH}",
            "train.eval_interval=3",
            "train.eval_batches=1",
            "optim.warmup_steps=1",
            "metrics.peak_tflops=1.0",  # no matmul benchmark at start-up
            "checkpoint.interval=3",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small story corpus through the project's own pipeline (the quickstart's 24k documents take ~15 s)."""
    from megatron_pept.data.corpus import generate_stories
    from megatron_pept.data.prepare import PrepareOptions, prepare_dataset
    from megatron_pept.data.tokenizer import train_tokenizer_from_sources

    work = tmp_path_factory.mktemp("small_data")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_stories(1500, seed=1)))
    tokenizer = train_tokenizer_from_sources([str(corpus)], output_dir=work / "tok", vocab_size=512, num_threads=1)
    options = PrepareOptions(
        inputs=(str(corpus),), tokenizer=str(tokenizer.path.parent), output=str(work / "data"), val_fraction=0.05
    )
    prepare_dataset(options, show_progress=False)
    return work / "data"


@pytest.fixture(scope="module")
def runs(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full-rank run and a ReLoRA run (rank 4, a restart after step 3), both with checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("full", []), ("relora", RELORA)):
        with Trainer(quick_cfg(small_data, root / name, *extra)) as trainer:
            trainer.train()
    return {"full": root / "full", "relora": root / "relora"}


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_dir_name(step)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, after checking its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert len(data) > 8_000, (path, len(data))  # axes, lines and text, not an empty canvas
    return struct.unpack(">II", data[16:24])


def one_line_error(capsys: pytest.CaptureFixture, rc: int, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), (rc, err)
    return err


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# -- plot_runs ---------------------------------------------------------------------------------------------------


def test_token_axis_and_duplicate_steps_pure() -> None:
    assert tokens_per_step({"train": {"global_batch_size": 8}, "data": {"seq_len": 32}}) == 256
    assert steps_to_tokens([0, 1, 6], tokens_per_step=256) == [0, 256, 1536]
    # a resumed run logs steps 2 and 3 again: the values logged last win, steps stay sorted
    assert last_value_per_step([(1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0), (3, 30.0), (4, 4.0)]) == (
        [1, 2, 3, 4],
        [1.0, 20.0, 30.0, 4.0],
    )
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1.0, 5.0], 1) == [1.0, 5.0]
    with pytest.raises(UserError, match="global_batch_size"):
        tokens_per_step({"train": {}})


def test_plots_of_real_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "figures"
    report = plot_runs([runs["full"], runs["relora"]], output=out, smooth=2)
    assert {name: fig["tags"] for name, fig in report["figures"].items()} == {
        "loss.png": ["train/loss", "val/loss"],
        "lr.png": ["train/lr"],
        "throughput.png": ["perf/tokens_per_sec"],
        "relora.png": RELORA_TAGS,  # a figure per method prefix present, no galore.png
    }
    assert report["figures"]["loss.png"]["runs"] == ["full", "relora"]
    assert report["figures"]["relora.png"]["runs"] == ["relora"]
    assert json.loads((out / "plots.json").read_text()) == report
    for name in report["figures"]:
        width, height = png_size(out / name)
        assert width >= 500 and height >= 300, name
    # the token axis: step x train.global_batch_size x data.seq_len of the run's config.yaml
    curves = read_run(runs["relora"])
    assert curves.tokens_per_step == BATCH * SEQ == report["runs"][1]["tokens_per_step"]
    assert curves.series["train/loss"][0] == list(range(1, STEPS + 1))
    assert curves.tokens("train/loss") == [s * BATCH * SEQ for s in range(1, STEPS + 1)]
    assert curves.tokens("val/loss") == [0, 3 * BATCH * SEQ, 6 * BATCH * SEQ]
    assert curves.series["relora/restarts"][1][-1] == 1.0  # one restart, after step 3


def write_events(run_dir: Path, *parts: dict[int, float]) -> None:
    """``train/loss`` events of a run that was resumed: one event file per part, read in this order."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"global_batch_size": 4}, "data": {"seq_len": 16}}))
    for i, values in enumerate(parts):
        writer = SummaryWriter(log_dir=str(run_dir / "tmp"))
        for step, value in values.items():
            writer.add_scalar("train/loss", value, global_step=step)
        writer.close()
        (event_file,) = (run_dir / "tmp").iterdir()
        event_file.rename(run_dir / f"events.out.tfevents.{1700000000 + i}.host.{i}")
        (run_dir / "tmp").rmdir()


def test_a_resumed_run_keeps_the_last_value_per_step(tmp_path: Path) -> None:
    first = {s: float(s) for s in range(1, 9)}
    # resumed from step 5 (steps 6..8 logged again) and from step 8 (step 8 logged again, steps not going back)
    write_events(tmp_path / "back", first, {s: 100.0 + s for s in range(6, 11)})
    write_events(tmp_path / "same", first, {s: 100.0 + s for s in range(8, 11)})
    for name, resumed_at in (("back", 6), ("same", 8)):
        steps, values = read_run(tmp_path / name).series["train/loss"]
        assert steps == list(range(1, 11)), name
        assert values == [float(s) if s < resumed_at else 100.0 + s for s in steps], name
        assert read_run(tmp_path / name).tokens("train/loss") == [s * 64 for s in steps]
    report = plot_runs([tmp_path / "back", tmp_path / "same"], output=tmp_path / "out", labels=["a", "b"])
    assert report["figures"] == {"loss.png": {"tags": ["train/loss"], "runs": ["a", "b"]}}
    png_size(tmp_path / "out" / "loss.png")


def test_plot_runs_errors_are_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    prog, out = "megatron-pept-plot-runs", str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    rc = plot_main([str(tmp_path / "empty"), "--output", out])
    assert "no TensorBoard event files" in one_line_error(capsys, rc, prog)
    rc = plot_main([str(runs["full"]), str(runs["relora"]), "--output", out, "--label", "only-one"])
    assert "1 --label for 2 run folders" in one_line_error(capsys, rc, prog)
    (tmp_path / "file").write_text("")
    rc = plot_main([str(runs["full"]), "--output", str(tmp_path / "file")])
    assert "is a file" in one_line_error(capsys, rc, prog)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
        rc = plot_main([str(runs["full"]), "--output", out])
        assert "pip install 'megatron_pept[study]'" in one_line_error(capsys, rc, prog)


@pytest.mark.slow  # a process
def test_plot_runs_wrapper_errors_are_one_line(tmp_path: Path) -> None:
    """The checkout's wrapper: same behaviour in a process of its own."""
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_runs.py"), str(tmp_path / "empty"), "--output", out],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("plot_runs.py: error:") and not (tmp_path / "out").exists()


# -- analyze_rank ------------------------------------------------------------------------------------------------


def test_init_is_the_runs_step0_model(runs: dict[str, Path], small_data: Path, tmp_path: Path) -> None:
    """init:RUN_DIR equals what a second trainer builds from the run's config (adapters included), that trainer's
    step-0 validation loss is the one the run logged, and RUN_DIR is neither written nor locked."""
    for name, run_dir in runs.items():
        before = snapshot(run_dir)
        model, _ = initial_model(run_dir, device="cpu")
        assert snapshot(run_dir) == before, name
        cfg = load_config(run_dir / "config.yaml", [f"run_dir={tmp_path / name}"])
        with Trainer(cfg) as trainer:
            reference = trainer.raw_model.state_dict()
            assert trainer.evaluate() == pytest.approx(read_run(run_dir).series["val/loss"][1][0], abs=1e-6)
            dense = trainer.method.export_weights(trainer.raw_model)
        state = model.state_dict()
        assert state.keys() == reference.keys(), name
        for key, value in reference.items():
            assert torch.equal(state[key], value), (name, key)
        rebuilt = initial_weights(run_dir, device="cpu").weights
        assert rebuilt.keys() == dense.keys() and all(torch.equal(rebuilt[k], dense[k]) for k in dense), name


def test_rank_of_relora_and_full_updates(runs: dict[str, Path], tmp_path: Path) -> None:
    """A ReLoRA cycle's update has at most `rank` non-zero singular values, two cycles at most twice that (and more
    than one cycle's); a full-rank run's update has many more."""
    full, relora = runs["full"], runs["relora"]
    pairs = [
        RankPair("full", f"init:{full}", str(full)),
        RankPair("relora", f"init:{relora}", str(relora)),  # newest checkpoint: step 6, two cycles
        RankPair("relora cycle 2", str(checkpoint(relora, 3)), str(checkpoint(relora, 6))),
        RankPair("relora cycle 1", f"init:{relora}", str(checkpoint(relora, 3))),
    ]
    out = tmp_path / "rank"
    report = analyze_rank(pairs, output=out, threshold=1e-6, init_device="cpu")
    by_label = {pair["label"]: pair["types"] for pair in report["pairs"]}
    for label, types in by_label.items():
        assert list(types) == list(LAYER_ORDER), label
        assert types["q_proj"]["shape"] == [64, 64] and types["k_proj"]["shape"] == [32, 64]
        assert types["gate_proj"]["shape"] == [176, 64] and types["down_proj"]["full_rank"] == 64
        assert all(len(s["counts"]) == 2 for s in types.values())  # two layers of each type
    for kind in LAYER_ORDER:
        for cycle in ("relora cycle 1", "relora cycle 2"):
            assert 1 <= by_label[cycle][kind]["count_min"] <= by_label[cycle][kind]["count_max"] <= RANK, kind
        assert RANK < by_label["relora"][kind]["count_max"] <= 2 * RANK, kind
        assert by_label["full"][kind]["count_min"] > 2 * RANK, kind
    assert report["pairs"][2]["a"]["step"] == 3 and report["pairs"][2]["b"]["step"] == 6
    assert json.loads((out / "rank.json").read_text()) == json.loads(json.dumps(report))
    table = (out / "rank.md").read_text()
    assert table.count("\n| relora cycle 2 | ") == len(LAYER_ORDER) and "| full | k_proj | 32x64 | 2 |" in table
    for name in ("rank_spectra.png", "rank_counts.png"):
        width, height = png_size(out / name)
        assert width >= 500 and height >= 300, name


def test_singular_values_match_an_independent_merge(runs: dict[str, Path]) -> None:
    """The tool's spectra equal torch.linalg.svdvals of differences computed here from the raw checkpoint tensors:
    ReLoRA's W + (alpha / rank) B A merged by hand, the full run's weights against a trainer's initial ones."""
    relora = runs["relora"]
    tool = update_spectra(
        load_dense(str(checkpoint(relora, 3))).weights, load_dense(str(checkpoint(relora, 6))).weights
    )
    raw = [load_full_tensors(checkpoint(relora, step), prefix="model.") for step in (3, 6)]

    def merged(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
        lora = state[f"{layer}.lora_B"].double() @ state[f"{layer}.lora_A"].double()
        return state[f"{layer}.weight"].double() + (ALPHA / RANK) * lora

    layers = sorted({key.rsplit(".", 1)[0] for key in raw[0] if key.endswith(".lora_A")})
    assert len(layers) == 2 * len(LAYER_ORDER) and sorted(k.removesuffix(".weight") for k in tool) == layers
    for layer in layers:
        expected = torch.linalg.svdvals(merged(raw[1], layer) - merged(raw[0], layer))
        torch.testing.assert_close(tool[f"{layer}.weight"], expected, rtol=0, atol=1e-7)

    full = runs["full"]
    initial, _ = initial_model(full, device="cpu")
    start = initial.state_dict()
    final = load_full_tensors(checkpoint(full, 6), prefix="model.")
    tool = update_spectra(initial_weights(full, device="cpu").weights, load_dense(str(full)).weights)
    for name, values in tool.items():
        expected = torch.linalg.svdvals(final[name].double() - start[name].double())
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-12)


def test_analyze_rank_errors_are_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    prog, out = "megatron-pept-analyze-rank", str(tmp_path / "out")
    full = runs["full"]
    other = tmp_path / "other"  # the same run with a narrower MLP: another model
    other.mkdir()
    config = yaml.safe_load((full / "config.yaml").read_text())
    config["model"]["intermediate_size"] = 96
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    rc = rank_main([f"init:{other}", str(full), "--output", out, "--init-device", "cpu"])
    assert "not the same model (model.layers.0.mlp.gate_proj.weight is 96x64" in one_line_error(capsys, rc, prog)
    rc = rank_main([str(full), "--output", out])
    assert "give two checkpoints (CKPT_A CKPT_B), not 1" in one_line_error(capsys, rc, prog)
    rc = rank_main([str(tmp_path / "missing"), str(full), "--output", out])
    assert "does not exist" in one_line_error(capsys, rc, prog)
    rc = rank_main([f"init:{tmp_path}", str(full), "--output", out])
    assert "config.yaml" in one_line_error(capsys, rc, prog)
    rc = rank_main(["--pair", "x", str(full), str(full), "--output", out, "--threshold", "-1"])
    assert "--threshold must be a positive number" in one_line_error(capsys, rc, prog)
    (tmp_path / "file").write_text("")
    rc = rank_main(["--pair", "x", str(full), str(full), "--output", str(tmp_path / "file")])
    assert "is a file" in one_line_error(capsys, rc, prog)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        rc = rank_main(["--pair", "x", str(full), str(full), "--output", out])
        assert "pip install 'megatron_pept[study]'" in one_line_error(capsys, rc, prog)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a process
def test_analyze_rank_wrapper_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    """The checkout's wrapper: same behaviour in a process of its own."""
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "analyze_rank.py"), str(runs["full"]), "--output", out],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("analyze_rank.py: error: give two checkpoints")
    assert not (tmp_path / "out").exists()


def test_analyze_rank_cli_pairs(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The positional pair (labelled after its run) and --pair share the figures; the same checkpoint twice has
    a zero update."""
    relora = runs["relora"]
    rc = rank_main(
        [f"init:{relora}", str(relora), "--pair", "same", str(relora), str(relora), "--output", str(tmp_path)]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "rank.json").read_text())
    assert [p["label"] for p in report["pairs"]] == ["relora", "same"]
    assert all(s["count_max"] == 0 for s in report["pairs"][1]["types"].values())
    assert "relora: init:" in capsys.readouterr().out
    png_size(tmp_path / "rank_spectra.png")
