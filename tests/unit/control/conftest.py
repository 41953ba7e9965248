"""An in-process bridge for control-plane unit tests: a real Target, the composition
root's real Attachments (vfio-user sockets) and the control methods' context."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.attachments import Attachments
from bridge.config import parse_config
from bridge.control.methods import Control
from bridge.scsi.target import Target


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vscsi-ctl-", dir="/tmp"))  # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def ctl(nursery, run_dir: Path) -> AsyncIterator[Control]:
    config = parse_config({
        "bridge": {"state_dir": str(run_dir)},
        "lu": [{"name": "disk0", "path": "disk0.img", "size": "4MiB"},
               {"name": "disk1", "path": "disk1.img", "size": "1MiB"}],
        "vfio_user": [{"socket": "vm1.sock", "luns": {"0": "disk0"}}],
    }, run_dir)
    target = Target(config.lus, config.lun_maps(), ports=config.port_map())  # as serve does
    attachments = Attachments(nursery, target, config)
    for att in config.vfio_user:
        await attachments.add_vfio_user(att)
    yield Control(target, attachments, str(run_dir), config.log_level)
    nursery.cancel_scope.cancel()
    target.close()
