"""Configs and checkpoints written by an earlier release keep working: tests/data/release-0.1.0 holds a run's
config.yaml and its checkpoint of step 2 as megatron_pept wrote them before issue 26 (every method.* key of the
one flat schema in config.yaml and in the checkpoint's saved config; no run id; see its README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_pept.checkpoint.export import load_full_tensors
from megatron_pept.registry import config_from_dict, load_config
from megatron_pept.trainer import Trainer

RELEASE = Path(__file__).resolve().parents[1] / "data" / "release-0.1.0"
STEP = RELEASE / "step_00000002"


def test_a_config_of_the_previous_release_loads_with_the_same_settings(caplog) -> None:
    saved = yaml.safe_load((RELEASE / "config.yaml").read_text())
    assert "ef_weight" in saved["method"] and "adam_mini_partition" in saved["method"]  # the old flat schema
    cfg = load_config(RELEASE / "config.yaml", ["data.path=unused"])
    assert cfg.method.name == "relora"
    for key in ("rank", "alpha", "reset_every", "target_modules", "base_dtype", "warm_start_steps", "prune_ratio"):
        assert cfg.method.options[key] == saved["method"][key], key
    assert (cfg.model.hidden_size, cfg.train.steps, cfg.optim.lr) == (32, 2, saved["optim"]["lr"])
    # The same from the copy every checkpoint keeps (what the HF export reads), with no warning about the other
    # families' keys the old schema wrote (they hold their defaults).
    meta = json.loads((STEP / "meta.json").read_text())
    with caplog.at_level("WARNING", logger="megatron_pept"):
        again = config_from_dict(meta["config"])
    assert again.method.options == cfg.method.options
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


def test_a_checkpoint_of_the_previous_release_resumes_and_exports(quickstart_data: Path, tmp_path: Path) -> None:
    """The checkpoint resumes (as the run's own: it records no run id) with the weights it holds, trains on,
    and exports (the export rebuilds the method from the checkpoint's saved config)."""
    run_dir = tmp_path / "run"
    shutil.copytree(STEP, run_dir / "checkpoints" / STEP.name)
    saved = load_full_tensors(STEP, prefix="model.")
    overrides = [f"run_dir={run_dir}", f"data.path={quickstart_data}", "train.steps=3", "checkpoint.interval=3"]
    with Trainer(load_config(RELEASE / "config.yaml", overrides)) as trainer:
        assert trainer.state.step == 2 and trainer.resumed_from == run_dir / "checkpoints" / STEP.name
        for name, value in trainer.raw_model.state_dict().items():
            assert torch.equal(value, saved[name]), name
        result = trainer.train()
    assert result.steps == 3 and all(loss == loss for loss in result.train_losses)
    pytest.importorskip("transformers")
    from megatron_pept.checkpoint.hf_export import dense_state_dict

    _, dense, _ = dense_state_dict(STEP)
    assert "model.layers.0.self_attn.q_proj.weight" in dense and "lora_A" not in " ".join(dense)
