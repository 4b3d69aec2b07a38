"""Shared fixtures: a real Konsilium server process and the bots' clip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from media_server.clip import Clip, load_clip
from tests.services import KonsiliumServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KonsiliumServer]:
    with KonsiliumServer(tmp_path / "data") as srv:
        yield srv


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    return load_clip(tmp_path_factory.mktemp("clips"))
