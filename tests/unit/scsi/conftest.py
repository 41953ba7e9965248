"""The ``target`` most core tests use (helpers.make_target, closed after the test); a
module that needs another shape of target defines its own fixture of that name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.scsi.target import Target

from .helpers import make_target


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = make_target(tmp_path)
    yield t
    t.close()
