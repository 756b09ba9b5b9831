"""Config schema: YAML + overrides, typing, errors that name the closest valid key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from megatron_pept.config import Config, DataSource, field_docs, save_config
from megatron_pept.errors import ConfigError
from megatron_pept.registry import all_keys, describe_config, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides() -> None:
    cfg = load_config(
        None,
        [
            "data.path=/d",
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; the schema makes it a float
            "train.steps=1_000",
            "optim.betas=0.9,0.95",
            "model.vocab_size=null",
            "train.compile=true",
            "method.name=full",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 1000
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.vocab_size is None
    assert cfg.train.compile is True


def test_every_field_has_a_docstring() -> None:
    def walk(cls: type) -> None:
        docs = field_docs(cls)
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp)
            else:
                assert docs.get(name), f"{cls.__name__}.{name} has no docstring"

    walk(Config)
    walk(DataSource)
    text = describe_config()
    for key in all_keys():
        assert key in text


def test_public_keys_exist() -> None:
    """The keys DESIGN.md promises to every run."""
    keys = set(all_keys())
    for key in (
        "run_dir",
        "model.name",
        "data.path",
        "train.steps",
        "train.seed",
        "method.name",
        "method.base_dtype",
        "parallel.backend",
        "parallel.zero_stage",
        "optim.per_layer",
    ):
        assert key in keys


@pytest.mark.parametrize(
    "override,message",
    [
        ("no_such_key=1", "unknown config key 'no_such_key'"),
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("trian.steps=3", "did you mean 'train.steps'?"),
        ("optim.lr=fast", "config key 'optim.lr' expects a number; got 'fast'"),
        ("train.steps=2.5", "config key 'train.steps' expects an integer"),
        ("train.compile=maybe", "expects true or false"),
        ("model.name=60M", "did you mean '60m'?"),
        ("parallel.backend=fsdp", "must be one of single, ddp, fsdp2, deepspeed"),
        ("optim.betas=0.9", "expects 2 values"),
        ("method.name=relroa", "did you mean 'relora'?"),
        ("train.global_batch_size=4", "must be >= train.micro_batch_size"),
        ("optim.lr", "is not of the form key=value"),
        ("train=3", "is a section"),
        ("train.steps.x=3", "unknown config key 'train.steps.x'"),
        ("guard.spike_loss_sigma=-1", "guard.spike_loss_sigma must be >= 0 (0: off); got -1"),
        ("guard.spike_grad_norm_ratio=0.5", "guard.spike_grad_norm_ratio must be > 1 (or 0: off); got 0.5"),
        ("guard.spike_window=1", "guard.spike_window must be >= 2 (accepted steps); got 1"),
        ("train.profile_steps=5:3", "train.profile_steps=5:3: the first step is after the last"),
        ("train.profile_steps=0:3", "train.profile_steps=0:3: steps count from 1"),
        ("train.profile_steps=7", "train.profile_steps must be FIRST:LAST, two step numbers"),
        ("train.profile_steps=3:1001", "ends after the run's last step (train.steps=1000)"),
    ],
)
def test_bad_values_are_one_clear_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.path=/d", override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.per_layer=true"], "cannot run with optim.per_layer=true (the update is applied inside backward"),
        (["parallel.backend=deepspeed", "parallel.zero_stage=2"], "cannot run with parallel.backend=deepspeed"),
        (["guard.enabled=false"], "need guard.enabled=true"),
    ],
)
@pytest.mark.parametrize("rule", ["guard.spike_loss_sigma=6", "guard.spike_grad_norm_ratio=10"])
def test_the_spike_rules_need_an_update_they_can_skip(rule: str, overrides: list[str], message: str) -> None:
    load_config(None, ["data.path=/d", *overrides])  # fine with the rules off (the default)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.path=/d", rule, *overrides])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_blend_list_of_sources(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.blend=[{path: a, weight: 3}, {path: b}]"])
    assert [(s.path, s.weight) for s in cfg.data.blend] == [("a", 3.0), ("b", 1.0)]
    with pytest.raises(ConfigError, match=r"unknown config key 'data.blend\[0\].wieght'; did you mean"):
        load_config(None, ["data.blend=[{path: a, wieght: 3}]"])
    with pytest.raises(ConfigError, match=r"data.blend\[0\].weight must be > 0"):
        load_config(None, ["data.blend=[{path: a, weight: 0}]"])


def test_yaml_include_and_round_trip(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model:\n  name: 60m\noptim:\n  lr: 5.0e-4\n  warmup_steps: 7\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\ndata:\n  path: x\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.seed=3"])
    assert (cfg.model.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.seed) == ("60m", 1e-3, 7, 3)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["optim"]["betas"] == [0.9, 0.999]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "cycle.yaml").write_text("include: cycle.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "cycle.yaml")
    (tmp_path / "typo.yaml").write_text("data:\n  path: x\nmodel:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        load_config(tmp_path / "typo.yaml")


STUDIES = REPO / "configs" / "studies"  # study specs (megatron-pept-study), not run configs


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "configs").rglob("*.yaml") if STUDIES not in p.parents), ids=lambda p: p.name
)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path, ["data.path=/somewhere"])


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_specs_load(path: Path) -> None:
    from megatron_pept.study.spec import load_spec

    spec = load_spec(path)
    for method in spec.methods:  # every run the study would start is a valid config
        for extra in ([], method.grid_overrides, method.probe_overrides):
            load_config(spec.config, [*spec.overrides, f"method.name={method.name}", *method.overrides, *extra])


def test_profile_steps_are_read_as_written_in_a_file_and_an_override(tmp_path: Path) -> None:
    """YAML 1.1 reads 10:12 as the base-60 integer 612; configs are read without base-60 numbers, so A:B stays the
    text the key expects, and an integer key written so is refused instead of becoming another number."""
    (tmp_path / "run.yaml").write_text("data:\n  path: x\ntrain:\n  profile_steps: 10:12\n")
    assert load_config(tmp_path / "run.yaml").train.profile_steps == "10:12"
    assert load_config(None, ["data.path=x", "train.profile_steps=1:1"]).train.profile_steps == "1:1"
    assert load_config(None, ["data.path=x"]).train.profile_steps is None
    with pytest.raises(ConfigError, match="config key 'train.steps' expects an integer; got '1:30'"):
        load_config(None, ["data.path=x", "train.steps=1:30"])
