"""The architecture's rules (docs/architecture.md), checked on the source and by extending the stack the way the
guide says: a new method and a new backend, each one class plus its registration, train without touching the
trainer."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import tiny as trainer_tiny

from megatron_pept.distributed import BACKENDS, Backend, register_backend
from megatron_pept.errors import ConfigError
from megatron_pept.methods import METHODS, Method, method_keys, register_method
from megatron_pept.methods.base import MethodSettings, require
from megatron_pept.models.loss import cross_entropy_loss
from megatron_pept.registry import describe_config, load_config
from megatron_pept.trainer import Trainer

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_pept"


def imported_modules(path: Path) -> set[str]:
    """Every ``megatron_pept...`` module a file imports (at any level: inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("megatron_pept")}


def files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if (PACKAGE / folder).is_dir() else [PACKAGE / folder]


# What each top-level module may import: docs/architecture.md's table, bottom to top ("above": every module listed
# before it; "anything": no rule).
ABOVE, ANYTHING = "everything above", "anything"
RULES: dict[str, set[str] | str] = {
    "errors": set(),
    "assets": set(),
    "faults": set(),
    "orphans": set(),
    "sharding": set(),
    "seeded": set(),
    "traits": set(),
    "train_state": set(),
    "metrics": set(),
    "safe_paths": {"errors"},
    "cli": {"errors"},
    "quant": {"errors"},
    "config": {"assets", "errors"},
    "optim": {"config", "errors", "seeded", "sharding"},
    "models": {"config", "errors", "safe_paths", "seeded"},
    "distributed": {"config", "errors", "sharding", "traits"},
    "data": {"config", "distributed", "errors", "faults", "orphans", "safe_paths"},
    "methods": {"config", "errors", "models", "optim", "quant", "sharding", "traits"},
    "registry": {"config", "distributed", "errors", "methods", "models"},
    "signals": {"distributed", "orphans"},
    "evaluation": {"distributed", "models"},
    "guard": {"config", "errors", "train_state"},
    "checkpoint": {"config", "data", "distributed", "errors", "faults", "methods", "models", "registry", "safe_paths"}
    | {"sharding"},
    "trainer": ABOVE,
    "train": ABOVE,
    "bench": ANYTHING,
    "study": ANYTHING,
    "plan": ABOVE,
    "tools": ANYTHING,
}


def top_level_modules() -> dict[str, list[Path]]:
    """Each top-level module or package of megatron_pept with its files (the package's own __init__ apart)."""
    out: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts == ("__init__.py",):
            continue
        out.setdefault(rel.parts[0].removesuffix(".py"), []).append(path)
    return out


def allowed(module: str) -> set[str] | None:
    rule = RULES[module]
    if rule == ANYTHING:
        return None
    if rule == ABOVE:
        return set(list(RULES)[: list(RULES).index(module)])
    return rule


def stack_imports(path: Path) -> set[str]:
    """The top-level modules of megatron_pept a file imports (``from megatron_pept import x`` counts as ``x``)."""
    out = set()
    for name in imported_modules(path):
        parts = name.split(".")
        if len(parts) >= 2:
            out.add(parts[1])
    return out


def test_every_module_has_an_import_rule_and_keeps_to_it() -> None:
    """Every module (config.py and data/ included) imports only what the table allows it, at any level."""
    modules = top_level_modules()
    assert set(modules) == set(RULES), "give every top-level module a row in RULES and in docs/architecture.md"
    for module, paths in modules.items():
        rule = allowed(module)
        if rule is None:
            continue
        for path in paths:
            bad = stack_imports(path) - rule - {module}
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


@pytest.mark.slow  # a fresh interpreter (the rule itself is checked statically above)
def test_loading_a_config_loads_no_part_of_the_stack() -> None:
    """Loading a config loads no method, backend, model or optimizer."""
    code = "import sys, megatron_pept.config as c; c.load_config(None, ['data.path=x', 'method.name=relora']); "
    code += "print(sorted(m for m in sys.modules if m.startswith('megatron_pept')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['megatron_pept', 'megatron_pept.assets', 'megatron_pept.config', 'megatron_pept.errors']"


def test_the_architecture_guide_lists_the_same_rules() -> None:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = text.split("## What each module owns, and what it may import", 1)[1].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        module, _, may = (cell.strip() for cell in line.strip("|").split("|"))
        name = module.strip("`").removesuffix("/").removesuffix(".py")
        rows[name] = may if may in (ABOVE, ANYTHING) else set(re.findall(r"`(\w+)`", may))
    assert rows == {m: (r if isinstance(r, str) else set(r)) for m, r in RULES.items()}
    assert list(rows) == list(RULES)  # the same order: "everything above" means the same


def calls_named(path: Path, names: set[str]) -> list[str]:
    return [
        f"{path.name}:{node.lineno}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
    ]


def test_the_trainer_and_checkpoint_code_probe_nothing() -> None:
    """Optional hooks are declared (Method, Backend, the shard-aware optimizer protocol), never found by probing;
    checkpoint code reads no private attribute of an optimizer."""
    probing = [
        c for f in [PACKAGE / "trainer.py", *files("checkpoint")] for c in calls_named(f, {"getattr", "hasattr"})
    ]
    assert not probing, probing
    for path in files("checkpoint"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "optimizer":
                assert not node.attr.startswith("_"), f"{path.name}:{node.lineno} reads optimizer.{node.attr}"


def test_the_trainer_names_no_backend_and_no_method() -> None:
    source = (PACKAGE / "trainer.py").read_text()
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = set(BACKENDS) | set(METHODS)
    assert not strings & names, strings & names
    identifiers = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    identifiers |= {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    assert not identifiers & {"engine", "DistributedDataParallel", "fully_shard", "no_sync", "deepspeed"}


def test_no_sharding_arithmetic_outside_the_views_module() -> None:
    """The FSDP row-chunk arithmetic (ceil(rows / world)) exists once, in megatron_pept/sharding.py."""
    for path in PACKAGE.rglob("*.py"):
        if path.name != "sharding.py":
            assert "// world)" not in path.read_text(), path


# -- a new method, as docs/architecture.md describes ------------------------------------------------------------


@dataclasses.dataclass
class SGDSettings(MethodSettings):
    family = "SGD"

    sgd_momentum: float = 0.0
    """full_sgd: momentum of plain SGD (0: none)."""

    def validate(self) -> None:
        require(0 <= self.sgd_momentum < 1, f"method.sgd_momentum must be in [0, 1); got {self.sgd_momentum}")


class FullRankSGD(Method):
    """The guide's example: every parameter trains with plain SGD, with a setting of its own (its file and the
    registration are all it takes)."""

    name = "full_sgd"
    settings_class = SGDSettings
    config_keys = ("sgd_momentum",)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for _, p in self.trainable_parameters(model)]
        return torch.optim.SGD(params, lr=self.optim_cfg.lr, momentum=self.cfg.sgd_momentum)


@pytest.fixture
def registered_sgd():
    register_method(FullRankSGD)
    yield FullRankSGD
    del METHODS[FullRankSGD.name]


def tiny(data: Path, run_dir: Path, *overrides: str):
    """test_trainer's small run: 4 steps at a constant rate, no clipping and no validation."""
    return trainer_tiny(
        data,
        run_dir,
        "train.steps=4",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "optim.lr=0.5",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "train.max_grad_norm=0",
        *overrides,
    )


def test_a_new_method_registers_and_trains(registered_sgd, quickstart_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny(quickstart_data, tmp_path / "sgd", "method.name=full_sgd", "train.steps=1"))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    # The step by hand: the mean loss of the step's two micro-batches, and SGD's w <- w - lr * grad.
    model = trainer.raw_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    position = trainer.loader.state_dict()
    losses = []
    for _ in range(trainer.grad_accum_steps):
        inputs, targets = trainer.loader.next_batch()
        losses.append(cross_entropy_loss(model(inputs), targets))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()))
    expected = {n: before[n] - 0.5 * g for (n, _), g in zip(model.named_parameters(), grads)}
    trainer.loader.load_state_dict(position)
    result = trainer.train()
    assert len(result.train_losses) == 1
    assert result.train_losses[0] == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()) == len(before)
    trainer.close()


def test_a_new_methods_setting_is_a_config_key_like_any_other(registered_sgd, quickstart_data, tmp_path) -> None:
    """Its key reads from the command line, is checked by its own validate, suggested on a typo, documented in
    --help-config, recorded in config.yaml, and reaches the optimizer."""
    cfg = load_config(None, ["data.path=/d", "method.name=full_sgd", "method.sgd_momentum=0.9"])
    assert cfg.method.options == {"sgd_momentum": 0.9}
    with pytest.raises(ConfigError, match=r"method.sgd_momentum must be in \[0, 1\); got 1.5"):
        load_config(None, ["data.path=/d", "method.name=full_sgd", "method.sgd_momentum=1.5"])
    with pytest.raises(ConfigError, match="did you mean 'method.sgd_momentum'"):
        load_config(None, ["data.path=/d", "method.name=full_sgd", "method.sgd_momentun=0.9"])
    text = describe_config()
    assert (
        "method.sgd_momentum = 0.0   [float]\n    full_sgd: momentum of plain SGD (0: none).\n    used by: full_sgd"
        in text
    )
    trainer = Trainer(tiny(quickstart_data, tmp_path / "sgd", "method.name=full_sgd", "method.sgd_momentum=0.9"))
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    trainer.close()


def test_an_unknown_method_lists_the_registered_ones(registered_sgd) -> None:
    with pytest.raises(ConfigError, match="did you mean 'full_sgd'"):
        load_config(None, ["data.path=/d", "method.name=full_sdg"])


# -- a new backend ----------------------------------------------------------------------------------------------


class CountingBackend(Backend):
    """One process that counts what the trainer asks of its backend."""

    name = "counting"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: dict[str, list] = {"backward": [], "step": [], "optimizers": []}

    def backward(self, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        self.calls["backward"].append(last)
        return super().backward(loss, last=last)

    def step(self, optimizer, params, *, max_norm, accept):
        self.calls["step"].append(max_norm)
        return super().step(optimizer, params, max_norm=max_norm, accept=accept)

    def use_optimizer(self, optimizer, *, replacing: bool) -> None:
        self.calls["optimizers"].append(replacing)


@pytest.fixture
def registered_backend():
    register_backend(CountingBackend)
    yield CountingBackend
    del BACKENDS[CountingBackend.name]


def test_a_new_backend_registers_and_runs_the_one_step_body(registered_backend, quickstart_data, tmp_path) -> None:
    overrides = ["method.name=relora", "method.warm_start_steps=2", "method.reset_every=100", "method.rank=4"]
    counted = Trainer(tiny(quickstart_data, tmp_path / "c", "parallel.backend=counting", *overrides))
    losses = counted.train().train_losses
    calls = counted.backend.calls
    assert calls["backward"] == [False, True] * 4  # two micro-batches per step; gradient sync on the last
    assert calls["step"] == [0.0] * 4
    assert calls["optimizers"] == [False, True]  # the warm-start switch replaced the optimizer through it
    counted.close()
    reference = Trainer(tiny(quickstart_data, tmp_path / "s", *overrides))
    assert reference.train().train_losses == losses  # the same arithmetic as the single-process backend
    reference.close()


# -- config follows the registry ---------------------------------------------------------------------------------


def test_each_method_declares_real_config_keys_and_help_config_shows_them() -> None:
    text = describe_config()
    for name, cls in METHODS.items():
        assert set(cls.config_keys) <= {f.name for f in dataclasses.fields(cls.settings_class)}, name
    for key in method_keys():
        assert text.count(f"\nmethod.{key} = ") == 1, key  # each key once
    assert "used by: relora, redora, repissa, reloqra" in text  # method.reset_every
    assert "used by: galore_dynamic, galore_dynamic_ef" in text  # method.dynamic_first


def recording(settings_class: type, reads: set[str]) -> type:
    """A subclass of a settings dataclass that records which of its fields the methods' code reads (not the
    registry in methods/__init__.py, which reads every field to type-check and record them, nor the settings' own
    ``validate``, which checks every field of the family)."""
    fields = {f.name for f in dataclasses.fields(settings_class)}

    class Recording(settings_class):
        def __getattribute__(self, name: str):
            if name in fields:
                frame = sys._getframe(1)
                caller = frame.f_code.co_filename.replace("\\", "/")
                method_code = "megatron_pept/methods/" in caller and not caller.endswith("methods/__init__.py")
                if method_code and frame.f_code.co_name != "validate":
                    reads.add(name)
            return object.__getattribute__(self, name)

    return dataclasses.dataclass(Recording)


@pytest.mark.parametrize("method", sorted(n for n in METHODS if n != "full_sgd"))
def test_a_method_reads_only_the_keys_it_declares(
    method: str, quickstart_data: Path, tmp_path: Path, monkeypatch
) -> None:
    cfg = tiny(
        quickstart_data,
        tmp_path / method,
        f"method.name={method}",
        "method.rank=4",
        "method.reset_every=2",
        "method.update_proj_gap=2",
        "method.dynamic_first=2",
        "optim.lr=3e-3",
        *(["method.warm_start_steps=1"] if method in ("lora", "relora") else []),
        # q_galore's quantisation groups must divide the debug model's rows (64, 176) and projectors
        *(["method.weight_group_size=16", "method.proj_group_size=32"] if method == "q_galore" else []),
    )
    reads: set[str] = set()
    monkeypatch.setattr(METHODS[method], "settings_class", recording(METHODS[method].settings_class, reads))
    trainer = Trainer(cfg)
    trainer.train()
    trainer.save_checkpoint()
    trainer.close()
    if METHODS[method].config_keys:
        assert reads, "nothing recorded: the recording config is not the one the method reads"
    assert reads <= set(METHODS[method].config_keys), sorted(reads - set(METHODS[method].config_keys))
