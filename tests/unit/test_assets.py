"""Shipped files and tool entry points: ``--config NAME`` finds the shipped configuration (a file of that name here
wins), the checkout's tools/*.py are the installed console scripts under their old names, and messages that send
the user to a tool name the installed command."""

from __future__ import annotations

import importlib
import re
import runpy
import sys
from pathlib import Path

import pytest

from megatron_pept import assets
from megatron_pept.config import load_config
from megatron_pept.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("prepare_data", "train_tokenizer", "convert_to_hf", "inspect_checkpoint", "bench")


def test_bare_name_is_the_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert assets.asset_dir("configs") == REPO / "configs"  # a checkout: its top-level folder
    assert load_config("quickstart") == load_config(REPO / "configs" / "quickstart.yaml")
    assert load_config("quickstart.yaml") == load_config(REPO / "configs" / "quickstart.yaml")
    shipped = load_config("relora_130m")  # include: full_130m.yaml, resolved next to the shipped file
    assert (shipped.model.name, shipped.method.name) == ("130m", "relora")
    (tmp_path / "quickstart.yaml").write_text("data:\n  path: mine\n")
    assert load_config("quickstart.yaml").data.path == "mine"  # a file of exactly that name here wins
    assert load_config("quickstart").data.path == "data/generated/quickstart"  # no file "quickstart": shipped
    with pytest.raises(
        ConfigError, match=r"does not exist; the package ships quickstart.yaml: pass --config quickstart"
    ):
        load_config("configs/quickstart.yaml")
    with pytest.raises(
        ConfigError, match=r"does not exist; pass an existing YAML file or a shipped config name .*relora_1b"
    ):
        load_config("nosuch")


def test_installed_folder_first_and_site_packages_never(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site-packages"
    (site / "megatron_pept" / "configs").mkdir(parents=True)
    (site / "megatron_pept" / "configs" / "tiny.yaml").write_text("data:\n  path: x\n")
    (site / "configs").mkdir()  # another distribution's top-level configs/ must not be taken for ours
    monkeypatch.setattr(assets, "_PACKAGE", site / "megatron_pept")
    assert assets.asset_dir("configs") == site / "megatron_pept" / "configs"
    assert assets.shipped_configs() == ["tiny"] and assets.asset_dir("launch") is None
    assert assets.resolve_config_path("tiny") == site / "megatron_pept" / "configs" / "tiny.yaml"
    assert assets.resolve_config_path("sub/tiny") == Path("sub/tiny")  # a path is never looked up
    (site / "megatron_pept" / "configs" / "tiny.yaml").unlink()
    assert assets.asset_dir("launch") is None
    monkeypatch.setattr(assets, "_PACKAGE", site / "nothing")
    assert assets.asset_dir("configs") is None and assets.shipped_configs() == []


def test_launch_dir_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert assets.launch_dir_main([]) == 0
    assert Path(capsys.readouterr().out.strip()) == REPO / "launch"
    assert assets.launch_dir_main(["--configs"]) == 0
    assert Path(capsys.readouterr().out.strip()) == REPO / "configs"


def test_console_scripts_and_wheel_mapping() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    scripts = project["scripts"]
    for name in TOOLS:
        command = "megatron-pept-" + name.replace("_", "-")
        assert scripts[command] == f"megatron_pept.tools.{name}:main", command
    for command, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), command
    extras = project["optional-dependencies"]
    assert any(r.startswith("transformers") for r in extras["hf"]) and any(
        r.startswith("tokenizers") for r in extras["hf"]
    )
    assert any(re.fullmatch(r"megatron_pept\[.*\bhf\b.*\]", r) for r in extras["dev"])
    setup = (REPO / "setup.py").read_text()
    assert '"configs": ["*.yaml"]' in setup and '"launch": [' in setup  # the folders the wheel carries


@pytest.mark.parametrize("name", TOOLS)
def test_checkout_wrapper_is_the_package_tool(name: str, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(f"megatron_pept.tools.{name}")
    old_prog = "tools/bench.py" if name == "bench" else f"{name}.py"
    # `python tools/NAME.py --help`, run as a script in this process (tests/e2e run the wrappers as processes)
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools" / f"{name}.py"), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(sys.argv[0], run_name="__main__")
    wrapper = capsys.readouterr()
    assert exit_.value.code == 0, wrapper.err
    assert wrapper.out == module.build_parser(old_prog).format_help()
    assert wrapper.out.startswith(f"usage: {old_prog} ")
    installed = module.build_parser().format_help()
    command = "megatron-pept-" + name.replace("_", "-")
    assert installed.startswith(f"usage: {command} ") and command == module.PROG


def test_messages_name_the_installed_commands(tmp_path: Path) -> None:
    from megatron_pept.checkpoint.export import load_full_tensors
    from megatron_pept.data.shards import read_index
    from megatron_pept.data.tokenizer import load_tokenizer
    from megatron_pept.errors import UserError

    checkout = r"\(tools/{}\.py in a checkout\)"
    with pytest.raises(UserError, match="make it with megatron-pept-prepare-data " + checkout.format("prepare_data")):
        read_index(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UserError, match="run megatron-pept-prepare-data --output on it " + checkout.format("prepare_data")
    ):
        read_index(tmp_path / "empty")
    with pytest.raises(UserError, match="make one with megatron-pept-train-tokenizer, tools/train_tokenizer.py in a"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(
        UserError, match="a shard folder made by megatron-pept-prepare-data " + checkout.format("prepare_data")
    ):
        load_config(None)
    with pytest.raises(
        UserError, match="export it with megatron-pept-convert-to-hf, tools/convert_to_hf.py in a checkout"
    ):
        load_full_tensors(tmp_path / "empty", prefix="model.")
