"""The control baseline's shape, and the papers' hyper-parameters in the shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pept.config import MethodConfig, ModelConfig, load_config
from megatron_pept.methods.control import control_shape, swiglu_width, trainable_parameters

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size", ["60m", "130m", "350m"])
def test_control_matches_the_lowrank_runs_trainable_count(size: str) -> None:
    trainable, total = trainable_parameters(ModelConfig(name=size), MethodConfig(name="relora"), vocab_size=32100)
    assert trainable < total
    shape = control_shape(ModelConfig(name=size), target_params=trainable, vocab_size=32100)
    assert abs(shape.relative_error) < 0.02
    assert shape.args.intermediate_size == swiglu_width(shape.args.hidden_size)
    # The control of ReLoRA's 60M run is its 40M model: width 416, 8 layers.
    if size == "60m":
        assert (shape.args.hidden_size, shape.args.num_layers) == (416, 8)


def test_warm_start_does_not_change_the_count() -> None:
    cold = trainable_parameters(ModelConfig(name="60m"), MethodConfig(name="relora"), vocab_size=1000)
    warm = trainable_parameters(
        ModelConfig(name="60m"), MethodConfig(name="relora", warm_start_steps=5), vocab_size=1000
    )
    assert cold == warm


def test_control_shape_tool() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/control_shape.py", "--config", "configs/relora_350m.yaml", "--vocab-size", "32100"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "125.6M trainable" in proc.stdout and "overrides: method.name=full model.hidden_size=" in proc.stdout


@pytest.mark.parametrize(
    "recipe,expected",
    [
        (
            "relora_130m",
            dict(
                name="relora",
                rank=128,
                reset_every=5000,
                warm_start_steps=5000,
                prune_ratio=0.99,
                restart_warmup_steps=100,
                optimizer_reset="magnitude_joint",
            ),
        ),
        (
            "relora_350m",
            dict(
                name="relora",
                rank=128,
                reset_every=5000,
                warm_start_steps=5000,
                prune_ratio=0.99,
                restart_warmup_steps=100,
            ),
        ),
        ("relora_1b", dict(name="relora", rank=128, reset_every=5000, prune_ratio=0.99)),
        ("approx_350m_relora", dict(name="relora", rank=256, reset_every=2500, warm_start_steps=0)),
        ("approx_350m_redora", dict(name="redora", rank=256, reset_every=2500)),
        ("approx_350m_repissa", dict(name="repissa", rank=256, reset_every=2500)),
        ("approx_350m_reloqra", dict(name="reloqra", rank=256, reset_every=10000, warm_start_steps=0)),
        ("approx_350m_reloqra_warmstart", dict(name="reloqra", rank=256, reset_every=10000, warm_start_steps=5000)),
        ("lora_350m", dict(name="lora", rank=128, warm_start_steps=0)),
    ],
)
def test_recipes_carry_the_papers_settings(recipe: str, expected: dict) -> None:
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    for key, value in expected.items():
        assert getattr(cfg.method, key) == value, key
    if recipe.startswith("approx_"):
        assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (1.5e-3, 1152, 48)
        assert (cfg.data.seq_len, cfg.train.steps, cfg.model.name) == (256, 20000, "350m")
    if recipe == "relora_1b":
        assert cfg.model.name == "1b" and cfg.optim.lr == 4e-4
