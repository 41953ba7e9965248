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


def _bridge(run_dir: Path, luns: dict[int, str], extra: tuple[str, ...] = ()) -> tuple[Target, VirtioScsiPciDevice]:
    specs = [LogicalUnitSpec(name=n, path=str(run_dir / f"{n}.img"), size=DISK_SIZE)
             for n in ("lu0", *extra)]
    target = Target(specs, {INITIATOR: luns})
    return target, VirtioScsiPciDevice(target, InitiatorPort(INITIATOR), num_queues=2)


async def _guest_wait(guest, condition: str, what: str, seconds: int = 60) -> str:
    """Poll a shell condition inside the guest (no rescan by hand)."""
    r = await guest.run(
        f"n=0; until {condition}; do n=$((n+1)); [ $n -gt {seconds * 5} ] && exit 1; usleep 200000; done;"
        " vscsi_lsscsi", timeout=seconds + 30,
    )
    assert r.rc == 0, f"guest never saw: {what}\n{r.output}\n{guest.console.text[-3000:]}"
    return r.output


@pytest.mark.booted
async def test_hotplug_and_resize_seen_by_guest(run_dir: Path) -> None:
    from tests.integration.guest import guest_session

    target, device = _bridge(run_dir, {0: "lu0"}, extra=("lu1",))
    sock = str(run_dir / "bridge.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            async with guest_session(attach="vfio-user", socket=sock) as guest:
                out = await _guest_wait(guest, "[ -e /sys/block/sda ]", "LUN 0")
                assert out.count("type=0") == 1, out
                # hot-add LUN 1: eventq TRANSPORT_RESET/RESCAN -> scsi_add_device
                target.map_lun(INITIATOR, 1, "lu1")
                out = await _guest_wait(guest, "[ -e /sys/bus/scsi/devices/0:0:0:1/block ]", "LUN 1 added")
                assert re.search(r"^\[0:0:0:1\] type=0 .* 67108864$", out, re.MULTILINE), out
                # grow LUN 0: eventq PARAM_CHANGE 2Ah/09h -> scsi_rescan_device
                target.resize("lu0", 2 * DISK_SIZE)
                out = await _guest_wait(guest, f"[ $(cat /sys/block/sda/size) -eq {2 * DISK_SIZE // 512} ]",
                                        "LUN 0 resized")
                assert re.search(r"^\[0:0:0:0\] type=0 .* 134217728$", out, re.MULTILINE), out
                # hot-remove LUN 1: eventq TRANSPORT_RESET/REMOVED -> scsi_remove_device
                target.unmap_lun(INITIATOR, 1)
                out = await _guest_wait(guest, "[ ! -e /sys/bus/scsi/devices/0:0:0:1 ]", "LUN 1 removed")
                assert "0:0:0:1" not in out and "[0:0:0:0]" in out, out
            nursery.cancel_scope.cancel()
    finally:
        target.close()


FIO_VERIFY = r"""
set -e
vscsi_wait_disks 1 60
# two jobs on disjoint 8 MiB ranges: random 4 KiB writes at depth 32, then crc32c verify
fio --name=verify --filename=/dev/sda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --iodepth=32 --numjobs=2 --size=8M --offset_increment=16M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --group_reporting >/tmp/fio.out 2>&1
echo "fio rc=$?"
grep -E "err=|IOPS" /tmp/fio.out
"""


@pytest.mark.booted
async def test_fio_verify_uses_all_request_queues(run_dir: Path) -> None:
    target, device = _bridge(run_dir, {0: "lu0"})
    sock = str(run_dir / "bridge.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            result = await run_guest(FIO_VERIFY, attach="vfio-user", socket=sock, smp=2, fio=True,
                                     timeout=500)
            nursery.cancel_scope.cancel()
    finally:
        target.close()
    out = result.output
    print(out)
    print("requests per virtqueue:", device.requests_per_queue)
    assert result.rc == 0, result.console[-4000:]
    assert "fio rc=0" in out and re.search(r"jobs=2\): err= 0", out), out
    assert re.search(r"read: IOPS=", out) and re.search(r"write: IOPS=", out), out  # verify pass ran
    # two vCPUs -> Linux uses both request queues (vq 2 and 3), a few thousand I/Os each
    assert device.requests_per_queue[2] > 500 and device.requests_per_queue[3] > 500, \
        device.requests_per_queue


@pytest.mark.booted
async def test_guest_reboot_and_qemu_restart_keep_data(run_dir: Path) -> None:
    from tests.integration.guest import guest_session

    target, device = _bridge(run_dir, {0: "lu0"})
    sock = str(run_dir / "bridge.sock")
    write = ("vscsi_wait_disks 1 60 && printf 'REBOOT-%026d\\n' $(seq 1 128) | head -c 4096 >/tmp/b"
             " && dd if=/tmp/b of=/dev/sda bs=4096 seek=100 oflag=direct conv=fsync 2>/dev/null"
             " && md5sum </tmp/b")
    check = ("vscsi_wait_disks 1 60 && dd if=/dev/sda bs=4096 skip=100 count=1 iflag=direct 2>/dev/null"
             " | md5sum")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            # guest.args has -no-reboot; a later -action reboot=reset lets the guest reboot in place
            async with guest_session(attach="vfio-user", socket=sock,
                                     extra_args=("-action", "reboot=reset")) as guest:
                r = await guest.run(write)
                assert r.rc == 0, r.output
                written = r.output.split()[0]
                # guest reboot: QEMU resets the device (DEVICE_RESET), the driver starts afresh
                await guest.qmp("system_reset")
                await guest.wait_hello()
                r = await guest.run(check)
                assert r.rc == 0 and r.output.split()[0] == written, r.output
            # QEMU gone (client disconnected); a new QEMU connects to the same bridge
            async with guest_session(attach="vfio-user", socket=sock) as guest:
                r = await guest.run(check)
                assert r.rc == 0 and r.output.split()[0] == written, r.output
            nursery.cancel_scope.cancel()
    finally:
        target.close()


MKFS_SCRIPT = r"""
set -e
vscsi_wait_disks 1 60
mkfs.ext4 -q -F /dev/sda
mkdir -p /mnt/t
mount -t ext4 /dev/sda /mnt/t
i=0; while [ $i -lt 20 ]; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k count=$((i + 1)) 2>/dev/null; i=$((i + 1)); done
md5sum /mnt/t/f* > /mnt/t/SUMS
sync
umount /mnt/t
mount -t ext4 /dev/sda /mnt/t
cd /mnt/t && md5sum -c SUMS >/dev/null && echo SUMS-OK
cd / && umount /mnt/t
echo FS-DONE
"""


@pytest.mark.booted
async def test_ext4_on_the_bridge_fscks_clean_on_host(run_dir: Path) -> None:
    import subprocess

    target, device = _bridge(run_dir, {0: "lu0"})
    sock = str(run_dir / "bridge.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, device)
            result = await run_guest(MKFS_SCRIPT, attach="vfio-user", socket=sock, timeout=400)
            nursery.cancel_scope.cancel()
    finally:
        target.close()
    assert result.rc == 0, result.console[-4000:]
    assert "SUMS-OK" in result.output and "FS-DONE" in result.output, result.output
    # the bridge has stopped: the image must be a clean ext4 file system
    fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    proc = subprocess.run([fsck, "-fn", str(run_dir / "lu0.img")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
