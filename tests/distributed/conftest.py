"""The session's launches of worker.py: one per launcher, for every run the selected tests need
(helpers.shared_launch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SharedLaunches


@pytest.fixture(scope="session")
def shared_launches(
    request: pytest.FixtureRequest, quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> SharedLaunches:
    return SharedLaunches(request.session, quickstart_data, tmp_path_factory)
