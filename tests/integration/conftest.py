"""Fixtures shared by the booted-guest tests (harness: tests/integration/guest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def sparse_image(tmp_path: Path) -> Callable[[int], Path]:
    """Factory: a sparse raw image of ``size`` bytes in the test's tmp directory."""
    counter = 0

    def make(size: int = 64 << 20) -> Path:
        nonlocal counter
        counter += 1
        path = tmp_path / f"disk{counter}.img"
        with path.open("wb") as f:
            f.truncate(size)
        return path

    return make
