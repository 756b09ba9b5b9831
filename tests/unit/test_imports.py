"""Every module of the package imports on a CPU-only machine (GPU-only extras such as flash-attn and
transformer-engine are imported inside the component that uses them), so even the fast tier, `pytest -m "not
slow"`, loads every module: a syntax error or a broken import anywhere fails here, not first in a slow test."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import megatron_pept

PACKAGE = Path(megatron_pept.__file__).parent


def walked() -> list[str]:
    """The package's modules as pkgutil finds them (importing each subpackage to look inside it)."""
    failed: list[str] = []
    names = [m.name for m in pkgutil.walk_packages(megatron_pept.__path__, "megatron_pept.", onerror=failed.append)]
    assert not failed, f"subpackages that do not import: {failed}"  # walk_packages would skip them silently
    return sorted(names)


def on_disk() -> list[str]:
    """The package's modules as files on disk (a subpackage that fails to import cannot hide its modules here)."""
    names = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names) - {"megatron_pept"})


MODULES = on_disk()


def test_pkgutil_finds_every_module_on_disk() -> None:
    assert walked() == MODULES
    assert {"megatron_pept.trainer", "megatron_pept.models.llama", "megatron_pept.methods"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)
