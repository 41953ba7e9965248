"""Booted: real Xen 4.17 in QEMU, Linux's own vscsi backend (xen-scsiback + LIO fileio) in dom0, and a
PV domU whose real xen-scsifront sees the disk. This proves the environment the bridge's Xen backend
is tested in, and is the reference the bridge is benchmarked against.
"""

from __future__ import annotations

import re

import pytest

from harness.xen import run_xen

pytestmark = pytest.mark.booted

WWN = "naa.6001405000000010"
PATTERN = "VSCSI-XEN-PATTERN-0123456789"

DOM0_SCRIPT = rf"""
set -u
truncate -s 64M /tmp/disk.img
printf '{PATTERN}' | dd of=/tmp/disk.img conv=notrunc status=none
lio_fileio_pvscsi /tmp/disk.img $((64 << 20)) {WWN} 0 || {{ echo "LIO configuration failed"; exit 10; }}
echo "lio: $(ls /sys/kernel/config/target/xen-pvscsi/{WWN}/tpgt_1/lun) nexus=$(cat /sys/kernel/config/target/xen-pvscsi/{WWN}/tpgt_1/nexus)"
dom=$(domu_create domu /vscsi/run/guest.sh) || exit 11
echo "domu created: domid $dom"
xl unpause domu
domu_wait_booted domu 120 || exit 14
# Nodes written once the domU's xen-scsifront is loaded: the frontend probes the new device at once.
t0=$(date +%s.%N)
vscsi_write_nodes "$dom" 0 {WWN}:0 0:0:0:0
i=0
be=/local/domain/0/backend/vscsi/$dom/0
until [ "$(xenstore-read $be/state 2>/dev/null)" = 4 ] && \
      [ "$(xenstore-read $be/vscsi-devs/dev-0/state 2>/dev/null)" = 4 ]; do
    i=$((i + 1)); [ $i -gt 600 ] && {{ echo "vscsi never connected"; xs_dump $be; exit 12; }}
    sleep 0.2
done
echo "connected after $(awk "BEGIN {{print $(date +%s.%N) - $t0}}") s"
echo "--- xenstore backend ---"; xs_dump $be
echo "--- xenstore frontend ---"; xs_dump /local/domain/$dom/device/vscsi/0
domu_wait_gone domu 300 || exit 13
vscsi_remove_nodes "$dom" 0
rc=$(domu_rc domu)
echo "domU rc: $rc"
[ "$rc" = 0 ]
"""

GUEST_SCRIPT = r"""
i=0
while [ ! -e /dev/sda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/sda ] || { echo "no /dev/sda"; ls /sys/class/scsi_device; exit 1; }
echo "scsi devices: $(ls /sys/class/scsi_device)"
sg_inq /dev/sg0 || exit 2
sg_readcap /dev/sda || exit 3
echo "pattern: $(dd if=/dev/sda bs=512 count=1 2>/dev/null | head -c 28)"
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/sda of=/dev/null bs=1M count=32 iflag=direct || exit 4
end=$(cut -d' ' -f1 /proc/uptime)
echo "read 32MiB O_DIRECT: $start -> $end"
# Stay connected a while: dom0 dumps the frontend's xenstore nodes once it sees state 4, and on an
# idle host this script can finish (and the frontend close) before that dump ran.
sleep 10
"""


async def test_domu_sees_lio_disk_through_xen_scsiback() -> None:
    result = await run_xen(DOM0_SCRIPT, files={"guest.sh": GUEST_SCRIPT}, timeout=900)
    assert "VSCSI-XEN-DOM0-READY" in result.output, result.describe()
    assert result.rc == 0, result.describe()
    guest = result.domu_console("domu")
    assert "VSCSI-DOMU-BOOTED" in guest, result.describe()
    # INQUIRY from LIO's fileio backstore, through xen-scsiback and the real xen-scsifront.
    assert re.search(r"Vendor identification:\s+LIO-ORG", guest), result.describe()
    assert re.search(r"Product identification:\s+FILEIO", guest), result.describe()
    # 64 MiB of 512-byte blocks.
    assert "Last LBA=131071" in guest, result.describe()
    assert f"pattern: {PATTERN}" in guest, result.describe()
    assert "33554432 bytes" in guest or "32.0MB" in guest or "32+0 records in" in guest, (
        result.describe()
    )
    assert "VSCSI-DOMU-RC=0" in guest, result.describe()
    # The nodes the kernel backend published once connected.
    script = result.script_output
    assert re.search(r"backend/vscsi/\d+/0/feature-sg-grant = \"\d+\"", script), result.describe()
    assert re.search(r"device/vscsi/0/ring-ref = \"\d+\"", script), result.describe()
    print(f"xen kernel-backend cycle: {result.seconds:.1f} s")
