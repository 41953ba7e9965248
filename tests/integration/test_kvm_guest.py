"""A booted Linux guest on the bridge's virtio-scsi device over vfio-user (QEMU 11 vfio-user-pci).

The target core, the virtio-scsi PCI device model and the vfio-user server run
in this test process; the guest (images/build-guest.sh) is attached with
qemu-configs/vfio-user.args. Inside it, Linux's virtio_pci + virtio_scsi bind,
the LUN is scanned, sg_inq / sg_readcap / a direct-I/O write and read-back run,
and the written block is checked in the backing image on the host afterwards.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from bridge.target.logical_unit import LogicalUnitSpec
from bridge.target.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from bridge.virtio.scsi_request import InitiatorPort
from tests.integration.guest import run_guest

INITIATOR = "iqn.2026-11.org.vscsi-bridge:kvm-guest"
DISK_SIZE = 64 << 20
PATTERN = "VSCSI-VFIO-USER-PAT-"  # 20 chars: 128 lines of 32 bytes = one 4 KiB block
PATTERN_LBA = 2048  # 512-byte blocks: offset 1 MiB

GUEST_SCRIPT = rf"""
set -e
vscsi_wait_disks 1 60
echo "--- lsscsi"
vscsi_lsscsi
sg=$(vscsi_lsscsi | awk '{{print $7}}' | head -n1)
echo "--- sg_inq $sg"
sg_inq "$sg"
echo "--- sg_readcap"
sg_readcap /dev/sda
echo "--- write+read"
i=0; while [ $i -lt 128 ]; do printf '{PATTERN}%011d\n' $i; i=$((i + 1)); done >/tmp/block
dd if=/tmp/block of=/dev/sda bs=4096 count=1 seek={PATTERN_LBA // 8} oflag=direct conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/sda of=/tmp/back bs=4096 count=1 skip={PATTERN_LBA // 8} iflag=direct 2>/dev/null
cmp /tmp/block /tmp/back && echo READBACK-OK
echo "--- 1 MiB sequential"
dd if=/dev/sda of=/dev/null bs=1M count=16 iflag=direct 2>&1 | tail -n1
echo "--- virtio features"
cat /sys/bus/virtio/devices/*/features
"""


@pytest.fixture
def run_dir():
    # unix socket paths are limited to 108 bytes: keep them short
    d = Path(tempfile.mkdtemp(prefix="vscsi-kvm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.booted
async def test_guest_over_vfio_user(run_dir: Path) -> None:
    image = run_dir / "lu0.img"
    target = Target(
        [LogicalUnitSpec(name="lu0", path=str(image), size=DISK_SIZE, serial="KVMTEST0")],
        {INITIATOR: {0: "lu0"}},
    )
    device = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR), num_queues=2)
    sock = str(run_dir / "bridge.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            result = await run_guest(GUEST_SCRIPT, attach="vfio-user", socket=sock, timeout=400)
            nursery.cancel_scope.cancel()
    finally:
        target.close()
    out = result.output
    print(out)
    print(f"boot to script: {result.boot_seconds:.1f} s, whole run {result.elapsed_seconds:.1f} s")
    assert result.rc == 0, result.console[-4000:]
    # virtio_scsi bound and the one LUN appeared as a disk with an sg node, 64 MiB
    assert re.search(r"^\[\d+:0:0:0\] type=0 .*/dev/sda /dev/sg\d+ 67108864$", out, re.MULTILINE), out
    assert re.search(r"Vendor identification: VSCSIBRG", out), out
    assert re.search(r"Product identification: vscsi-bridge", out), out
    assert "Last LBA=131071 (0x1ffff), Number of logical blocks=131072" in out, out
    assert "READBACK-OK" in out, out
    assert "16+0 records out" in out, out  # 1 MiB direct reads (max_sectors 2048) all complete
    # negotiated: HOTPLUG (1), CHANGE (2), INDIRECT_DESC (28), EVENT_IDX (29), VERSION_1 (32)
    features = re.search(r"^([01]{64})$", out, re.MULTILINE)
    assert features, out
    assert [i for i, b in enumerate(features.group(1)) if b == "1"] == [1, 2, 28, 29, 32]
    # the guest's write reached the backing image
    with image.open("rb") as f:
        f.seek(PATTERN_LBA * 512)
        block = f.read(4096)
    assert block.startswith(f"{PATTERN}00000000000\n".encode()), block[:64]
    assert f"{PATTERN}00000000127\n".encode() in block
