"""Shared fixtures: paths of the local assets (``../shared/assets`` from the project root)."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = (Path(__file__).parents[1] / ".." / "shared" / "assets").resolve()


@pytest.fixture(scope="session")
def assets() -> Path:
    """The assets folder; skips the test when it is missing."""
    if not ASSETS.is_dir():
        pytest.skip(f"local assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture(scope="session")
def asset(assets: Path):
    """``asset("models/stories260K/tok512.bin")`` -> its path; skips the test when it is missing."""

    def get(relative: str) -> Path:
        path = assets / relative
        if not path.exists():
            pytest.skip(f"local asset not found: {path}")
        return path

    return get
