"""Names the core defines once: the IQN prefix, the target port name, the APTPL file name."""

from __future__ import annotations

from pathlib import Path

import bridge.scsi
from bridge.scsi.identity import IQN_PREFIX, TARGET_PORT_NAME
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.reservations import state_path_for
from bridge.scsi.target import Target


def test_the_iqn_prefix_is_written_once_in_the_core() -> None:
    root = Path(bridge.scsi.__file__).parent
    holders = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.py"))
               if IQN_PREFIX in p.read_text()]
    assert holders == ["identity.py"]
    assert TARGET_PORT_NAME.startswith(IQN_PREFIX + ":")


def test_the_target_and_its_lus_use_the_shared_names(tmp_path: Path) -> None:
    image = str(tmp_path / "lu0.img")
    target = Target([LogicalUnitSpec(name="lu0", path=image, size=1 << 20)], {})
    try:
        assert target.target_port_name == TARGET_PORT_NAME
        assert target.logical_unit("lu0").reservations.state_path == state_path_for(image)
        assert state_path_for(image) == image + ".pr.json"
    finally:
        target.close()
