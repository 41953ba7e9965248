"""Experiment (prints figures, asserts nothing): a QEMU 11 guest nested in the TCG Xen dom0.

    python3 images/xen/nested_kvm_guest.py

The Xen issue asks whether one bridge process in dom0 could serve both kinds of guest
booted for real: a PV domU through vscsiif and a QEMU guest over vfio-user, the latter
then a TCG guest inside the TCG-emulated PV dom0. This boots Xen (harness/
xen.py), shares the host's image cache into dom0 (QEMU 11 from the trixie tree
runs there through its own loader, the guest kernel and initramfs come with it), starts
the bridge's vfio-user server on one LU in dom0 and the usual test guest attached to it,
which writes and reads back a block. It prints how long the nested guest took.

Measured 2026-11-22 (2-core host, otherwise idle): the nested guest ran its script after
357 s of its own uptime; QEMU exited after 413 s; the whole Xen run took 446 s. The same
guest boots in 5-10 s on the host. Too slow to pair with a real domU in CI: the one-core
test (tests/integration/test_one_core_both_guests.py) keeps the booted QEMU guest on the
host and drives the Xen side through the simulated platform.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness import guest as g  # noqa: E402
from harness.xen import run_xen  # noqa: E402

SOCKET = "/tmp/nested.sock"
GUEST = r"""
vscsi_wait_disks 1 600 || { echo "NESTED no disk"; exit 1; }
echo "NESTED disk up t=$(cut -d' ' -f1 /proc/uptime)"
printf 'NESTED-PATTERN-%032d' 7 > /tmp/p
dd if=/tmp/p of=/dev/sda bs=512 count=1 seek=100 oflag=direct conv=sync 2>/dev/null
echo "NESTED read back: $(dd if=/dev/sda bs=512 count=1 skip=100 iflag=direct 2>/dev/null | head -c 47)"
"""
# The bridge in dom0: one LU for one vfio-user initiator (the Xen side is the booted test's job).
BRIDGE = r"""
import sys, trio
sys.path.insert(0, "/vscsi/src")
from bridge.scsi.logical_unit import LogicalUnitSpec
from bridge.scsi.target import Target
from bridge.vfio_user.server import serve
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from bridge.scsi.request import InitiatorPort
NAME = "iqn.2026-11.org.vscsi-bridge:nested"
SOCKET = sys.argv[1]
async def main():
    target = Target([LogicalUnitSpec(name="d0", path="/tmp/disk.img", size=16 << 20)], {NAME: {0: "d0"}})
    device = VirtioScsiPciDevice(target, InitiatorPort(NAME), num_queues=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, SOCKET, device)
        open("/tmp/bridge.ready", "w").write("ready\n")
        await trio.sleep_forever()
trio.run(main)
"""


def log(msg: str) -> None:
    print(f"[nested {time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def main() -> int:
    qemu, image = await g.ensure_images()
    cache = g.CACHE.resolve()
    launch = g._prepare(qemu=qemu, image=image, script=GUEST, attach="vfio-user", socket=SOCKET,
                        disk_image=None, smp=1, mem="256M", accel="tcg", aio="threads", fio=False,
                        append="", extra_args=[], serial_extra=[], log_path=None)
    initrd = launch.workdir / "initrd"
    argv = ["/vscsi/run/nested-initrd" if a == str(initrd) else a for a in launch.argv]
    dom0 = f"""
mkdir -p {cache} && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose cache {cache} || exit 5
truncate -s 16M /tmp/disk.img
python3 /vscsi/run/bridge.py {SOCKET} > /vscsi/run/bridge.log 2>&1 &
i=0; while [ ! -f /tmp/bridge.ready ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -f /tmp/bridge.ready ] || {{ cat /vscsi/run/bridge.log; exit 7; }}
start=$(cut -d' ' -f1 /proc/uptime)
echo "nested QEMU starting"
timeout 1800 {" ".join(shlex.quote(a) for a in argv)} </dev/null >/vscsi/run/nested.log 2>&1
echo "nested QEMU exit $? after $(awk -v s=$start '{{print $1 - s}}' /proc/uptime) s"
grep -a 'NESTED\\|VSCSI-READY' /vscsi/run/nested.log
"""
    log("booting Xen; the nested guest's lines follow when dom0 prints them")
    result = await run_xen(
        dom0, files={"bridge.py": BRIDGE, "nested-initrd": initrd.read_bytes()},
        extra_shares={"cache": cache}, timeout=2700,
        progress=lambda line: log(line) if "nested" in line.lower() else None,
    )
    print(result.script_output)
    log(f"whole Xen run {result.seconds:.0f} s, dom0 rc {result.rc}")
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
