"""The control baseline's shape, and the papers' hyper-parameters in the shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pept.config import MethodConfig, ModelConfig
from megatron_pept.methods.control import control_shape, swiglu_width, trainable_parameters
from megatron_pept.registry import load_config

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


APPROX = dict(lr=1.5e-3, global_batch_size=1152, micro_batch_size=48, seq_len=256, steps=20000, model="350m")
MAGNITUDE_JOINT = {"method.optimizer_reset": "magnitude_joint"}  # ours; the papers prune each moment on its own
SCRIPTS_60M = dict(model="60m", lr=1e-2, warmup_steps=1000, steps=10000, global_batch_size=512, seq_len=256)
SCRIPTS_60M |= dict(max_grad_norm=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6)
PURE_BF16 = {"train.dtype": "auto"}  # the scripts cast the whole model (and so the optimizer state) to bf16

# recipe -> (the paper's settings it carries, its departures from the paper: key -> our value). Every departure must
# be declared in the recipe's header on a line "# Departure: KEY ..."; the paper's settings are checked as stated.
RECIPES = {
    # ReLoRA section 3 and Table 1.
    "relora_130m": (
        dict(name="relora", rank=128, reset_every=5000, warm_start_steps=5000, prune_ratio=0.99)
        | dict(restart_warmup_steps=100, steps=20000, model="130m", global_batch_size=600, seq_len=256),
        MAGNITUDE_JOINT,
    ),
    "relora_350m": (
        dict(name="relora", rank=128, reset_every=5000, warm_start_steps=5000, prune_ratio=0.99)
        | dict(restart_warmup_steps=100, steps=20000, model="350m", global_batch_size=1152, seq_len=512),
        MAGNITUDE_JOINT,
    ),
    # ReLoRA section 4.1: rank 128, lr 5e-4, 10k warm start of 30k steps, 50-step restart warm-ups; Table 1 batch.
    "relora_1b": (
        dict(name="relora", rank=128, lr=5e-4, warm_start_steps=10000, steps=30000, restart_warmup_steps=50)
        | dict(prune_ratio=0.99, model="1b", global_batch_size=1536, seq_len=512),
        {**MAGNITUDE_JOINT, "optim.lr": 5e-4, "method.restart_warmup_steps": 50},
    ),
    "lora_350m": (dict(name="lora", rank=128, warm_start_steps=0), {}),
    # Approximations paper section 5.
    "approx_350m_base": (dict(name="full", lr=5e-4) | {k: v for k, v in APPROX.items() if k != "lr"}, {}),
    "approx_350m_relora": (
        dict(name="relora", rank=256, reset_every=2500, restart_warmup_steps=100) | APPROX,
        MAGNITUDE_JOINT,
    ),
    "approx_350m_redora": (
        dict(name="redora", rank=256, reset_every=2500, restart_warmup_steps=100) | APPROX,
        MAGNITUDE_JOINT,
    ),
    "approx_350m_repissa": (dict(name="repissa", rank=256, reset_every=2500) | APPROX, MAGNITUDE_JOINT),
    "approx_350m_reloqra": (
        dict(name="reloqra", rank=256, reset_every=10000, warm_start_steps=0) | APPROX,
        MAGNITUDE_JOINT,
    ),
    "approx_350m_reloqra_warmstart": (
        dict(name="reloqra", rank=256, reset_every=10000, warm_start_steps=5000, qr_residual=False) | APPROX,
        MAGNITUDE_JOINT,
    ),
    "approx_350m_galore": (dict(name="galore", rank=256, galore_scale=1.0, update_proj_gap=50) | APPROX, {}),
    "approx_350m_galore_ef": (
        dict(name="galore_ef", rank=256, galore_scale=1.0, update_proj_gap=50, ef_weight=0.1) | APPROX,
        {},
    ),
    "approx_350m_galore_dynamic": (
        dict(name="galore_dynamic", rank=256, galore_scale=1.0, dynamic_first=200, dynamic_growth=1.5)
        | APPROX
        | dict(dynamic_cap=2500, dynamic_rule="step"),
        {},
    ),
    "approx_350m_galore_dynamic_ef": (
        dict(name="galore_dynamic_ef", rank=256, galore_scale=1.0, dynamic_first=200, dynamic_growth=1.5)
        | APPROX
        | dict(dynamic_cap=2500, dynamic_rule="step", ef_weight=0.2),
        {},
    ),
    "approx_350m_adam_mini": (
        dict(name="adam_mini", adam_mini_partition="tensor") | APPROX | dict(lr=5e-4),
        {},
    ),
    # The APOLLO and Fira authors' 60M C4 scripts (scripts/pretrain_c4/llama_60m_apollo{,_mini}.sh;
    # pre_training_c4/scripts/llama_60m.sh): the model cast to bf16 there, autocast over fp32 masters here.
    "apollo_60m": (
        dict(name="apollo", rank=128, apollo_scale=1.0, update_proj_gap=200, norm_growth_limit=1.01) | SCRIPTS_60M,
        PURE_BF16,
    ),
    "apollo_mini_60m": (
        dict(name="apollo_mini", apollo_scale=128.0, update_proj_gap=200, norm_growth_limit=1.01) | SCRIPTS_60M,
        PURE_BF16,
    ),
    "fira_60m": (
        dict(name="fira", rank=128, galore_scale=0.25, update_proj_gap=200, svd="full", norm_growth_limit=1.01)
        | SCRIPTS_60M,
        PURE_BF16,
    ),
}
WHERE = {"lr": "optim", "steps": "train", "global_batch_size": "train", "micro_batch_size": "train", "seq_len": "data"}
WHERE |= {"warmup_steps": "optim", "eps": "optim", "betas": "optim", "weight_decay": "optim", "max_grad_norm": "train"}


def setting(cfg, section: str, key: str):
    """A config value by section and key; a method setting as the resolved config records it."""
    if section == "method" and key != "name":
        return cfg.method.options[key]
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_carry_the_papers_settings_and_declare_departures(recipe: str) -> None:
    paper, departures = RECIPES[recipe]
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    for key, value in paper.items():
        section = "model" if key == "model" else WHERE.get(key, "method")
        actual = cfg.model.name if key == "model" else setting(cfg, section, key)
        assert actual == value, f"{section}.{key}"
    text = (REPO / "configs" / f"{recipe}.yaml").read_text()
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# Departure:")}
    assert declared == set(departures), "declare each departure on a '# Departure: KEY' line, and only those"
    for key, value in departures.items():
        section, name = key.split(".")
        assert setting(cfg, section, name) == value, key


def test_every_recipe_is_checked() -> None:
    shipped = {p.stem for p in (REPO / "configs").glob("*.yaml")} - {"quickstart"}
    papers = {name for name in shipped if name.startswith(("relora_", "lora_", "approx_", "apollo_", "fira_"))}
    assert papers == set(RECIPES)
