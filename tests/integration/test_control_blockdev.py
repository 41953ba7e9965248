"""Block-device LUs follow their device: a loop device grown with ``losetup -c`` (the
kernel's RESIZE=1 uevent) grows the LU, with CAPACITY DATA HAS CHANGED for its
initiator; sysfs traits in lu.list; a device with larger logical blocks than the LU's
is refused. Needs root and loop devices (fails otherwise, saying so); no guest."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from bridge.control import jsonrpc as j
from bridge.control.client import ControlError
from bridge.control.pytest_plugin import vscsi_bridge, vscsi_bridge_factory  # noqa: F401

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _needs_loop_devices():
    """A test that cannot run here fails with the reason (never a skip to go green)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("losetup"):
        pytest.fail("needs root, /dev/loop-control and losetup (util-linux)")


@pytest.fixture
def loop_device(tmp_path):
    made = []

    def make(size: int, sector_size: int = 512) -> tuple[str, str]:
        image = tmp_path / f"loop{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        dev = subprocess.check_output(["losetup", "-f", "--show", "--sector-size", str(sector_size),
                                       str(image)], text=True).strip()
        made.append(dev)
        return dev, str(image)

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_loop_device_grows_and_the_lu_follows(vscsi_bridge, loop_device):  # noqa: F811
    c = vscsi_bridge.client
    dev, image = loop_device(8 * MiB)
    lu = c.lu_add(name="blk", path=dev)
    assert lu["size"] == 8 * MiB and lu["block_device"]["logical_block_size"] == 512
    assert lu["block_device"]["device"].startswith("7:")
    c.lun_map(initiator=VM1, lun=2, lu="blk")
    assert c.status()["block_devices"]["uevents"] is True
    os.truncate(image, 16 * MiB)
    subprocess.check_call(["losetup", "-c", dev])
    deadline = time.monotonic() + 20
    while c.lu_list()[1]["size"] != 16 * MiB:
        assert time.monotonic() < deadline, vscsi_bridge.log()[-2000:]
        time.sleep(0.1)
    st = c.status()
    assert st["block_devices"]["resized"] == 1
    ua = [u for u in st["unit_attentions"] if u["lu"] == "blk" and u["initiator"] == VM1]
    assert ua and "2Ah/09h" in ua[0]["pending"], st["unit_attentions"]
    # lu.resize without a size re-reads the device (here: nothing changed)
    assert c.lu_resize(name="blk")["size"] == 16 * MiB
    with pytest.raises(ControlError) as e:
        c.lu_resize(name="blk", size=32 * MiB)
    assert e.value.code == j.REFUSED and "block device" in e.value.message
    c.lu_remove(name="blk", force=True)


def test_device_with_larger_blocks_refused(vscsi_bridge, loop_device):  # noqa: F811
    dev, _ = loop_device(8 * MiB, sector_size=4096)
    with pytest.raises(ControlError) as e:
        vscsi_bridge.client.lu_add(name="big", path=dev)
    assert e.value.code == j.REFUSED and "logical block size" in e.value.message
    assert vscsi_bridge.client.lu_add(name="big", path=dev, block_size=4096)["block_size"] == 4096
    vscsi_bridge.client.lu_remove(name="big")


async def test_a_removed_backing_device_is_hot_unplugged(tmp_path, loop_device):
    """A ``remove`` uevent for an LU's device: every LUN it had is unmapped (the guests'
    hot-unplug event), commands find no LU there, status keeps what it had. The kernel
    sends that event only once nothing holds the device, so it is given to the watcher
    as the kernel words it (parse_uevent's own tests read real datagrams)."""
    from bridge.control.uevents import BlockDeviceWatcher
    from bridge.scsi.events import LunRemoved
    from bridge.scsi.logical_unit import LogicalUnitSpec
    from bridge.scsi.target import Target
    from tests.unit.scsi.helpers import assert_check, run

    dev, _ = loop_device(8 * MiB)
    target = Target([LogicalUnitSpec(name="blk", path=dev)], {VM1: {0: "blk"}, "iqn.x:b": {3: "blk"}})
    events = []
    target.subscribe(events.append)
    watcher = BlockDeviceWatcher(target)
    rdev = os.stat(dev).st_rdev
    watcher.handle({"SUBSYSTEM": "block", "ACTION": "remove", "DEVNAME": dev.removeprefix("/dev/"),
                    "MAJOR": str(os.major(rdev)), "MINOR": str(os.minor(rdev))})
    assert sorted(events, key=str) == sorted([LunRemoved(VM1, 0), LunRemoved("iqn.x:b", 3)], key=str)
    assert target.luns_for(VM1) == [] and target.nexuses_of("blk") == []
    r = await run(target, bytes(6), initiator=VM1, clear_ua=False)  # TEST UNIT READY
    assert_check(r, 0x05, 0x25)  # ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED
    assert watcher.removed["blk"]["luns"] == [[VM1, 0], ["iqn.x:b", 3]]
    # an event for another device changes nothing
    watcher.handle({"SUBSYSTEM": "block", "ACTION": "remove", "MAJOR": "259", "MINOR": "99"})
    assert len(events) == 2
    target.close()


async def test_block_device_traits_reach_the_vpd_pages(loop_device):
    """sysfs queue limits of a backing block device become what the guest reads:
    rotation rate (B1h), unmap and transfer limits (B0h), physical block exponent."""
    import struct

    from bridge.scsi.logical_unit import LogicalUnitSpec
    from bridge.scsi.target import Target
    from tests.unit.scsi.helpers import assert_good, run

    dev, _ = loop_device(8 * MiB)
    rdev = os.stat(dev).st_rdev
    queue = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue"

    def sysfs(name: str) -> int:
        with open(f"{queue}/{name}") as f:
            return int(f.read())

    target = Target([LogicalUnitSpec(name="blk", path=dev)], {VM1: {0: "blk"}})
    try:
        lu = target.logical_unit("blk")
        assert lu.traits is not None and lu.traits.device == f"{os.major(rdev)}:{os.minor(rdev)}"
        r = await run(target, bytes((0x12, 1, 0xB1, 0, 64, 0)), data_in=64, initiator=VM1)
        assert_good(r)
        rate = struct.unpack_from(">H", r.data, 4)[0]
        assert rate == (0 if sysfs("rotational") else 1)
        r = await run(target, bytes((0x12, 1, 0xB0, 0, 64, 0)), data_in=64, initiator=VM1)
        assert_good(r)
        max_transfer, optimal = struct.unpack_from(">II", r.data, 8)
        max_unmap, _descs, granularity = struct.unpack_from(">III", r.data, 20)
        hw = sysfs("max_hw_sectors_kb") * 1024
        assert max_transfer <= hw // 512 and optimal <= max_transfer
        if sysfs("discard_max_bytes"):
            assert max_unmap <= sysfs("discard_max_bytes") // 512
            assert granularity * 512 >= sysfs("discard_granularity")
        assert lu.physical_block_size == max(512, sysfs("physical_block_size"))
    finally:
        target.close()
