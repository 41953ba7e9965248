"""A booted Linux guest on the bridge's virtio-scsi device over vfio-user (QEMU 11 vfio-user-pci).

The target core, the virtio-scsi PCI device model and the vfio-user server run
in this test process; the guest (images/build-guest.sh) is attached with
qemu-configs/vfio-user.args. Inside it, Linux's virtio_pci + virtio_scsi bind,
the LUN is scanned, sg_inq / sg_readcap / a direct-I/O write and read-back run,
and the written block is checked in the backing image on the host afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import trio

from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.request import InitiatorPort
from bridge.scsi.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from harness.guest import disk_check_script
from tests.integration.served import run_guest_served

INITIATOR = "iqn.2026-11.org.vscsi-bridge:kvm-guest"
DISK_SIZE = 64 << 20
PATTERN = "VSCSI-VFIO-USER-PAT-"  # 20 chars: 128 lines of 32 bytes = one 4 KiB block
PATTERN_LBA = 2048  # 512-byte blocks: offset 1 MiB

GUEST_SCRIPT = disk_check_script(PATTERN, PATTERN_LBA) + r"""
echo "--- 1 MiB sequential"
dd if=/dev/sda of=/dev/null bs=1M count=16 iflag=direct 2>&1 | tail -n1
echo "--- virtio features"
cat /sys/bus/virtio/devices/*/features
"""


@pytest.mark.booted
async def test_guest_over_vfio_user(run_dir: Path) -> None:
    image = run_dir / "lu0.img"
    target = Target(
        [LogicalUnitSpec(name="lu0", path=str(image), size=DISK_SIZE, serial="KVMTEST0")],
        {INITIATOR: {0: "lu0"}},
    )
    device = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR), num_queues=2)
    sock = str(run_dir / "bridge.sock")
    result = await run_guest_served(target, device, sock, GUEST_SCRIPT, timeout=400)
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
    from harness.guest import guest_session

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
    result = await run_guest_served(target, device, sock, FIO_VERIFY, smp=2, fio=True, timeout=500)
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
    from harness.guest import guest_session

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
    result = await run_guest_served(target, device, sock, MKFS_SCRIPT, timeout=400)
    assert result.rc == 0, result.console[-4000:]
    assert "SUMS-OK" in result.output and "FS-DONE" in result.output, result.output
    # the bridge has stopped: the image must be a clean ext4 file system
    fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    proc = subprocess.run([fsck, "-fn", str(run_dir / "lu0.img")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class _BlockingVfioUserClient:
    """A hostile vfio-user client (blocking sockets, run in a worker thread) that also
    plays a virtio driver: tests.unit.virtio.fakes.Driver drives it as a device."""

    def __init__(self, path: str) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.next_id = 1

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError("server closed the connection")
            out += chunk
        return out

    def call(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> tuple[int, bytes]:
        """Send one request; (error errno or 0, reply payload)."""
        import array
        import socket
        import struct as st

        from bridge.vfio_user import protocol as p

        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        data = p.encode_message(msg_id, command, payload)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)
        msg_id_r, cmd_r, size, flags, err = st.unpack("=HHIII", self._recv_exact(16))
        body = self._recv_exact(size - 16)
        assert (msg_id_r, cmd_r) == (msg_id, command), (msg_id_r, cmd_r, msg_id, command)
        return (err if flags & p.FLAG_ERROR else 0), body

    # the device surface fakes.Driver uses
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        import struct as st

        err, body = self.call(9, st.pack("=QII", offset, index, count))
        assert err == 0, err
        return body[16:]

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        import struct as st

        err, _ = self.call(10, st.pack("=QII", offset, index, len(data)) + data)
        assert err == 0, err

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        import struct as st

        from bridge.vfio_user import protocol as p

        flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        err, _ = self.call(8, st.pack("=IIIII", 20, flags, index, start, len(fds)), tuple(fds))
        for fd in fds:
            os.close(fd)
        assert err == 0, err


def _hostile_session(path: str) -> dict[str, object]:
    """Runs in a thread: malformed messages and descriptor chains against a second device."""
    import json
    import mmap
    import struct as st
    import time

    from bridge.virtio.virtqueue import VIRTQ_DESC_F_INDIRECT as IND
    from bridge.virtio.virtqueue import VIRTQ_DESC_F_NEXT as NXT
    from bridge.virtio.virtqueue import VIRTQ_DESC_F_WRITE as WR
    from tests.unit.virtio.fakes import Driver, FakeDma
    from tests.unit.virtio.test_scsi_device import RESP_LEN, cmd_req, parse_resp

    out: dict[str, object] = {}
    c = _BlockingVfioUserClient(path)
    caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096}}
    err, _ = c.call(1, st.pack("=HH", 0, 0) + json.dumps(caps).encode() + b"\0")
    assert err == 0
    size = 4 << 20
    from tests.hostile.client import sealed_memfd  # the bridge maps only shrink-sealed memfds

    fd = sealed_memfd(size, "hostile-guest")
    mem = mmap.mmap(fd, size)
    err, _ = c.call(2, st.pack("=IIQQQ", 32, 3, 0, 0, size), (fd,))
    os.close(fd)
    assert err == 0
    # malformed vfio-user messages: each gets an errno, the connection stays
    out["errors"] = [
        c.call(77)[0],  # unknown command
        c.call(9, st.pack("=QII", 0, 99, 4))[0],  # no such region
        c.call(9, st.pack("=QII", 1 << 40, 4, 4))[0],  # offset past the BAR
        c.call(10, st.pack("=QII", 0, 7, 100) + b"x")[0],  # count larger than the data
    ]
    dma = FakeDma(size=4096)
    dma.mem = mem  # the driver's rings and buffers live in the shared memfd
    dma._base = memoryview(mem)
    drv = Driver(c, dma)
    drv.init(queue_size=8)
    rq = 2
    req = dma.alloc(51)
    dma.write(req, cmd_req(b"\x00"))
    resp = dma.alloc(RESP_LEN)

    def wait_used(n: int) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            got += drv.used(rq)
            time.sleep(0.01)
        return got

    results = []
    hostile = [
        [(req, 51, NXT, 1), (resp, RESP_LEN, WR | NXT, 2), (size + 4096, 4096, WR, 0)],  # outside
        [(req, 51, NXT, 1), (resp, RESP_LEN, WR | NXT, 2), (resp, 8, WR | NXT, 1)],  # loop
        [(resp, RESP_LEN, WR | NXT, 1), (req, 51, 0, 0)],  # writable before readable
        [(req, 51, NXT, 1), (resp, RESP_LEN, WR | NXT, 2), (req, 16, IND | NXT, 0)],  # bad indirect
    ]
    for chain in hostile:
        dma.write(resp, b"\xee" * RESP_LEN)
        for i, (a, n, f, nx) in enumerate(chain):
            drv.write_desc(rq, i, a, n, f, nx)
        drv.publish(rq, 0)
        drv.kick(rq)
        used = wait_used(1)
        results.append((used, parse_resp(dma.read(resp, RESP_LEN))["response"]))
    out["hostile"] = results
    # and a good request afterwards
    drv.queues[rq].free = list(range(8))
    drv.add_chain(rq, [(req, 51)], [(resp, RESP_LEN)])
    drv.kick(rq)
    used = wait_used(1)
    out["good"] = (used, parse_resp(dma.read(resp, RESP_LEN)))
    out["status"] = drv.status()
    drv.close()
    c.sock.close()
    dma._base.release()
    mem.close()
    return out


@pytest.mark.booted
async def test_hostile_client_beside_a_booted_guest(run_dir: Path) -> None:
    """A second device of the same bridge process gets malformed vfio-user messages and
    descriptor chains; each is answered with an error or virtio FAILURE, and the booted
    guest on the first device goes on reading and writing correctly meanwhile."""
    from harness.guest import guest_session

    hostile_ini = "iqn.2026-11.org.vscsi-bridge:hostile"
    target = Target([LogicalUnitSpec(name="lu0", path=str(run_dir / "lu0.img"), size=DISK_SIZE),
                     LogicalUnitSpec(name="lu1", path=str(run_dir / "lu1.img"), size=DISK_SIZE)],
                    {INITIATOR: {0: "lu0"}, hostile_ini: {0: "lu1"}})
    guest_dev = VirtioScsiPciDevice(target, InitiatorPort(INITIATOR), num_queues=2)
    hostile_dev = VirtioScsiPciDevice(target, InitiatorPort(hostile_ini), num_queues=1)
    sock_a, sock_b = str(run_dir / "a.sock"), str(run_dir / "b.sock")
    io_loop = ("vscsi_wait_disks 1 60; i=0; while [ $i -lt 40 ]; do"
               " dd if=/dev/urandom of=/tmp/w bs=64k count=1 2>/dev/null;"
               " dd if=/tmp/w of=/dev/sda bs=64k seek=$i oflag=direct 2>/dev/null;"
               " dd if=/dev/sda of=/tmp/r bs=64k skip=$i count=1 iflag=direct 2>/dev/null;"
               " cmp /tmp/w /tmp/r || exit 1; i=$((i+1)); done; echo IO-OK")
    report: dict[str, object] = {}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock_a, guest_dev)
            await nursery.start(serve, sock_b, hostile_dev)
            async with guest_session(attach="vfio-user", socket=sock_a) as guest:
                async with trio.open_nursery() as both:
                    async def attack() -> None:
                        report.update(await trio.to_thread.run_sync(_hostile_session, sock_b))

                    both.start_soon(attack)
                    r = await guest.run(io_loop, timeout=300)
                assert r.rc == 0 and "IO-OK" in r.output, r.output
            nursery.cancel_scope.cancel()
    finally:
        target.close()
    import errno

    from bridge.virtio.pci import STATUS_NEEDS_RESET
    from bridge.virtio.scsi_wire import VirtioScsiResponse

    errors = report["errors"]
    assert all(e in (errno.ENOSYS, errno.EINVAL, errno.ERANGE, errno.EFAULT) for e in errors), errors
    # outside memory, loop, writable-before-readable, indirect+NEXT: each chain is returned
    # to the driver with virtio FAILURE in its response buffer
    for used, response in report["hostile"]:
        assert [u[0] for u in used] == [0], report["hostile"]
        assert response == VirtioScsiResponse.FAILURE, report["hostile"]
    used, good = report["good"]
    assert len(used) == 1 and good["response"] == VirtioScsiResponse.OK, good
    # the target answers the new initiator's first command: GOOD or its power-on UNIT ATTENTION
    assert good["status"] == 0 or (good["status"] == 2 and good["sense"][2] & 0xF == 6), good
    assert hostile_dev.guest_errors >= 4
    assert not guest_dev.guest_errors and not guest_dev.pci.status & STATUS_NEEDS_RESET
