"""The control baseline's shape, and the papers' hyper-parameters in the shipped recipes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from param_counts import adapter_params, llama_params, lowrank_trainable

from megatron_pept.config import MethodConfig, ModelConfig
from megatron_pept.methods.control import control_shape, swiglu_width, trainable_parameters
from megatron_pept.models import MODEL_SHAPES, llama_args
from megatron_pept.registry import load_config

REPO = Path(__file__).resolve().parents[2]


def shape_of(args) -> dict[str, int]:
    names = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    return {name: getattr(args, name) for name in names}


@pytest.mark.parametrize("size", ["60m", "130m", "350m"])
def test_control_matches_the_lowrank_runs_trainable_count(size: str) -> None:
    trainable, total = trainable_parameters(ModelConfig(name=size), MethodConfig(name="relora"), vocab_size=32100)
    shape = MODEL_SHAPES[size]
    assert trainable == lowrank_trainable(vocab=32100, rank=128, **shape)  # ReLoRA's r = 128 on every projection
    assert total == llama_params(vocab=32100, tied=False, **shape) + adapter_params(rank=128, **shape)
    control = control_shape(ModelConfig(name=size), target_params=trainable, vocab_size=32100)
    assert control.params == llama_params(vocab=32100, tied=False, **shape_of(control.args))
    assert abs(control.relative_error) < 0.02
    assert control.args.intermediate_size == swiglu_width(control.args.hidden_size)
    # The control of ReLoRA's 60M run is its 40M model: width 416, 8 layers.
    if size == "60m":
        assert (control.args.hidden_size, control.args.num_layers) == (416, 8)


def test_warm_start_does_not_change_the_count() -> None:
    cold = trainable_parameters(ModelConfig(name="60m"), MethodConfig(name="relora"), vocab_size=1000)
    warm = trainable_parameters(
        ModelConfig(name="60m"), MethodConfig(name="relora", warm_start_steps=5), vocab_size=1000
    )
    assert cold == warm


def checkout_tool(name: str) -> ModuleType:
    """tools/NAME.py of the checkout, loaded as a module (its main runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"checkout_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_control_shape_tool(capsys: pytest.CaptureFixture[str]) -> None:
    """The counts it prints, against the counts written out from the 350m shape (r = 128, T5 vocabulary)."""
    config = str(REPO / "configs/relora_350m.yaml")
    code = checkout_tool("control_shape").main(["--config", config, "--vocab-size", "32100"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 3, lines
    shape = MODEL_SHAPES["350m"]
    trainable = lowrank_trainable(vocab=32100, rank=128, **shape)
    total = llama_params(vocab=32100, tied=False, **shape) + adapter_params(rank=128, **shape)
    assert lines[0] == (
        f"relora on 350m (rank 128, vocab 32100): {trainable / 1e6:.1f}M trainable of {total / 1e6:.1f}M parameters"
    )
    overrides = dict(item.split("=") for item in lines[2].split()[1:])
    assert lines[2].startswith("overrides: method.name=full ") and overrides.pop("method.name") == "full"
    control = {key.removeprefix("model."): int(value) for key, value in overrides.items()}
    params = llama_params(vocab=32100, tied=False, **control)
    assert lines[1] == (
        f"control: {params / 1e6:.1f}M parameters ({100 * (params / trainable - 1):+.1f}%), "
        f"{control['num_layers']} layers of width {control['hidden_size']}"
    )
    assert abs(params / trainable - 1) < 0.02 and control["num_layers"] == shape["num_layers"]


APPROX = dict(lr=1.5e-3, global_batch_size=1152, micro_batch_size=48, seq_len=256, steps=20000, model="350m")
MAGNITUDE_JOINT = {"method.optimizer_reset": "magnitude_joint"}  # ours; the papers prune each moment on its own
SCRIPTS_60M = dict(model="60m", lr=1e-2, warmup_steps=1000, steps=10000, global_batch_size=512, seq_len=256)
SCRIPTS_60M |= dict(max_grad_norm=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6)
PURE_BF16 = {"train.dtype": "auto"}  # the scripts cast the whole model (and so the optimizer state) to bf16
# The Q-GaLore authors' C4 scripts (scripts/pretrain_c4/llama_{60m,7b}.sh, run_pretrain.py's defaults).
Q_GALORE = dict(name="q_galore", galore_scale=0.25, stochastic_round=True, proj_quant=True, proj_bits=4)
Q_GALORE |= dict(proj_group_size=256, cos_threshold=0.4, gamma_proj=2.0, queue_size=5, seq_len=256, weight_decay=0.0)
Q_GALORE |= dict(global_batch_size=512, betas=(0.9, 0.95), eps=1e-8)

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
    "q_galore_60m": (
        Q_GALORE
        | dict(model="60m", rank=128, update_proj_gap=200, lr=1.5e-2, warmup_steps=1000, steps=10000)
        | dict(max_grad_norm=0.0),
        {"method.weight_group_size": 32, "train.dtype": "auto", "train.max_grad_norm": 0.0},
    ),
    "q_galore_7b": (
        Q_GALORE
        | dict(model="7b", rank=1024, update_proj_gap=500, lr=4e-3, warmup_steps=15000, steps=150000)
        | dict(weight_group_size=256),
        {"parallel.backend": "fsdp2", "optim.per_layer": False, "train.max_grad_norm": 1.0, "train.dtype": "auto"},
    ),
    "fira_60m": (
        dict(name="fira", rank=128, galore_scale=0.25, update_proj_gap=200, svd="full", norm_growth_limit=1.01)
        | SCRIPTS_60M,
        PURE_BF16,
    ),
}
# The Muon family on the AdamW baselines' rates, batches and budgets (configs/full_*.yaml): Moonlight's Muon (match
# AdamW's RMS, weight decay 0.1), NorMuon's Algorithm 1 (beta2 0.95, RMS 0.2), Dion's Algorithm 1 (rank 1/4, mu 0.95,
# the authors' weight decay 0.01; its sqrt(m / n) scale at lr 0.02 replaced by the RMS match: one lr for both groups).
BASELINE = {"60m": 1e-3, "350m": 5e-4, "1b": 4e-4}
for _size, _lr in BASELINE.items():
    _common = dict(model=_size, lr=_lr, betas=(0.9, 0.95), muon_momentum=0.95, muon_lr_adjust="match_rms_adamw")
    RECIPES[f"muon_{_size}"] = (
        dict(name="muon", weight_decay=0.1, muon_nesterov=True, ns_steps=5, ns_dtype="bf16") | _common,
        {},
    )
    RECIPES[f"normuon_{_size}"] = (
        dict(name="normuon", weight_decay=0.1, normuon_beta2=0.95, ns_steps=5, ns_dtype="bf16") | _common,
        {},
    )
    RECIPES[f"dion_{_size}"] = (
        dict(name="dion", weight_decay=0.01, rank_fraction=0.25)
        | {k: v for k, v in _common.items() if k != "muon_lr_adjust"},
        {"method.muon_lr_adjust": "match_rms_adamw"},
    )
WHERE = {"lr": "optim", "steps": "train", "global_batch_size": "train", "micro_batch_size": "train", "seq_len": "data"}
WHERE |= {"warmup_steps": "optim", "eps": "optim", "betas": "optim", "weight_decay": "optim", "max_grad_norm": "train"}


def setting(cfg, section: str, key: str):
    """A config value by section and key; a method setting as the resolved config records it."""
    if section == "method" and key != "name":
        return cfg.method.options[key]
    return getattr(getattr(cfg, section), key)


def declared_departures(recipe: str) -> set[str]:
    """The keys a recipe's header declares departures for ('# Departure: KEY ...' lines)."""
    text = (REPO / "configs" / f"{recipe}.yaml").read_text()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# Departure:")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_carry_the_papers_settings_and_declare_departures(recipe: str) -> None:
    paper, departures = RECIPES[recipe]
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    for key, value in paper.items():
        section = "model" if key == "model" else WHERE.get(key, "method")
        actual = cfg.model.name if key == "model" else setting(cfg, section, key)
        assert actual == value, f"{section}.{key}"
    assert declared_departures(recipe) == set(departures), (
        "declare each departure on a '# Departure: KEY' line, and only those"
    )
    for key, value in departures.items():
        section, name = key.split(".")
        assert setting(cfg, section, name) == value, key


# ReLoRA (Lialin et al., 2023), Table 1: "Hyperparameters of the language models trained in this study. Batch size
# and data amount are specified in tokens."
#
#   Params  Hidden  Heads  Layers  Learning rate  Batch size  Seq. len.  Data amount
#   60M     512     8      8       1e-3           122K        256        1.2B
#   130M    768     12     12      1e-3           154K        256        2.6B
#   250M    768     16     24      5e-4           590K        512        6.8B
#   350M    1024    16     24      5e-4           590K        512        6.8B
#   1.3B    2048    24     32      4e-4           786K        512        23.1B
#
# Written here as the table prints it (our size names as keys), not from our code.
TABLE_1 = {
    "60m": dict(hidden=512, heads=8, layers=8, lr=1e-3, batch_tokens_k=122, seq_len=256, tokens_b=1.2),
    "130m": dict(hidden=768, heads=12, layers=12, lr=1e-3, batch_tokens_k=154, seq_len=256, tokens_b=2.6),
    "250m": dict(hidden=768, heads=16, layers=24, lr=5e-4, batch_tokens_k=590, seq_len=512, tokens_b=6.8),
    "350m": dict(hidden=1024, heads=16, layers=24, lr=5e-4, batch_tokens_k=590, seq_len=512, tokens_b=6.8),
    "1b": dict(hidden=2048, heads=24, layers=32, lr=4e-4, batch_tokens_k=786, seq_len=512, tokens_b=23.1),
}
# The full-rank baselines of Table 1's runs, and the size each trains.
FULL_RECIPES = {"full_60m": "60m", "full_130m": "130m", "full_350m": "350m", "full_1b": "1b"}
# Table 1's 1.3B row cannot be taken as printed: 2048 is not a multiple of 24 heads, and 32 layers of that width make
# a 1.74B model whose low-rank run trains 291M parameters, where Table 2 gives 250M (24 layers: 1.34B and 251M).
# Heads and layers look swapped there; our 1b has 32 heads and 24 layers, and configs/full_1b.yaml declares no
# departure for it.
TABLE_1_HEADS_AND_LAYERS_1B = pytest.mark.xfail(
    strict=True, reason="Table 1 prints 24 heads and 32 layers for 1.3B; our 1b has 32 heads and 24 layers"
)


@pytest.mark.parametrize("size", sorted(TABLE_1))
def test_named_sizes_have_relora_table_1_widths(size: str) -> None:
    assert llama_args(ModelConfig(name=size)).hidden_size == TABLE_1[size]["hidden"]


@pytest.mark.parametrize(
    "size", [pytest.param(s, marks=TABLE_1_HEADS_AND_LAYERS_1B) if s == "1b" else s for s in sorted(TABLE_1)]
)
def test_named_sizes_have_relora_table_1_heads_and_layers(size: str) -> None:
    args = llama_args(ModelConfig(name=size))
    assert (args.num_heads, args.num_layers) == (TABLE_1[size]["heads"], TABLE_1[size]["layers"])
    assert args.num_kv_heads == args.num_heads  # multi-head attention, as in the paper's LLaMA


@pytest.mark.parametrize("recipe", sorted(FULL_RECIPES))
def test_full_recipes_follow_relora_table_1(recipe: str) -> None:
    """Learning rate, sequence length, the batch in tokens (the table's K: 480 x 256 = 122,880 is printed 122K, so
    to within 1K) and the data amount (steps x batch, to within half the table's last digit), unless the recipe's
    header declares a departure for the key."""
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    assert cfg.model.name == FULL_RECIPES[recipe] and cfg.method.name == "full"
    row, declared = TABLE_1[cfg.model.name], declared_departures(recipe)
    batch_tokens = cfg.train.global_batch_size * cfg.data.seq_len
    checks = {
        "optim.lr": cfg.optim.lr == row["lr"],
        "data.seq_len": cfg.data.seq_len == row["seq_len"],
        "train.global_batch_size": abs(batch_tokens - 1000 * row["batch_tokens_k"]) < 1000,
        "train.steps": abs(cfg.train.steps * batch_tokens - 1e9 * row["tokens_b"]) <= 0.05e9,
    }
    assert not [key for key, ok in checks.items() if not ok and key not in declared], (cfg, row)


def test_every_recipe_is_checked() -> None:
    shipped = {p.stem for p in (REPO / "configs").glob("*.yaml")} - {"quickstart"}
    prefixes = ("relora_", "lora_", "approx_", "apollo_", "fira_", "full_", "q_galore_", "muon_", "normuon_", "dion_")
    papers = {name for name in shipped if name.startswith(prefixes)}
    assert papers == set(RECIPES) | set(FULL_RECIPES)
