"""The files shipped with the package: the run configurations (``configs/``) and the launch scripts (``launch/``).

In a checkout they are the top-level ``configs/`` and ``launch/`` folders (the source of truth); a wheel carries
the same files as ``megatron_pept/configs`` and ``megatron_pept/launch`` (``setup.py`` maps them in), so an
installed package runs ``--config quickstart`` with no checkout at hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ASSETS = ("configs", "launch")
_PACKAGE = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path | None:
    """The folder of shipped ``name`` files (installed package first, then the checkout), or None."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset folder {name!r}; one of {', '.join(ASSETS)}")
    installed = _PACKAGE / name
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent
    # Only a megatron_pept checkout: the folder above an installed package is site-packages.
    if (checkout / "pyproject.toml").is_file() and (checkout / name).is_dir():
        return checkout / name
    return None


def shipped_configs() -> list[str]:
    """Names of the shipped configurations (``quickstart``, ``relora_350m``, ...), sorted."""
    folder = asset_dir("configs")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """``--config`` as given: an existing file is taken as it is; otherwise a bare name (``quickstart`` or
    ``quickstart.yaml``, no folder part) is the shipped configuration of that name. Anything else is returned
    unchanged, for the reader to report as missing."""
    given = Path(path)
    if given.is_file() or given.parent != Path(".") or given.suffix not in ("", ".yaml"):
        return given
    folder = asset_dir("configs")
    if folder is not None and (folder / f"{given.stem}.yaml").is_file():
        return folder / f"{given.stem}.yaml"
    return given


def missing_config_hint(path: str | os.PathLike[str]) -> str:
    """The end of the one-line error for a --config that is neither a file nor a shipped name."""
    names = shipped_configs()
    stem = Path(path).stem
    if stem in names:
        return f"; the package ships {stem}.yaml: pass --config {stem}"
    if names:
        return f"; pass an existing YAML file or a shipped config name to --config ({', '.join(names)})"
    return "; pass an existing YAML file to --config"


def launch_dir_main(argv: list[str] | None = None) -> int:
    """``megatron-pept-launch-dir``: print the folder of the shipped launch scripts (or, with --configs, of the
    shipped configurations), e.g. ``$(megatron-pept-launch-dir)/torchrun.sh --config quickstart``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="megatron-pept-launch-dir",
        description="Print the folder of the launch scripts shipped with the package (torchrun.sh, deepspeed.sh, "
        'slurm.sbatch), e.g. bash "$(megatron-pept-launch-dir)/torchrun.sh" --config quickstart',
    )
    parser.add_argument("--configs", action="store_true", help="print the folder of the shipped configs instead")
    args = parser.parse_args(argv)
    name = "configs" if args.configs else "launch"
    folder = asset_dir(name)
    if folder is None:
        print(f"{parser.prog}: error: this installation of megatron_pept carries no {name}/ folder", file=sys.stderr)
        return 2
    print(folder)
    return 0
