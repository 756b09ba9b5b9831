"""Shared fixtures: the built-in quickstart data, made once per test session (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_pept.data.builtin import ensure_builtin_dataset

    return ensure_builtin_dataset("quickstart", tmp_path_factory.mktemp("data") / "quickstart")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
