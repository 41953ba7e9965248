"""Fixtures shared by the booted-guest tests (harness: harness/guest.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
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


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A per-test directory directly under /tmp: unix socket paths (the bridge's vfio-user
    socket, QMP) are limited to 108 bytes, too few for pytest's tmp_path."""
    d = Path(tempfile.mkdtemp(prefix="vscsi-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
