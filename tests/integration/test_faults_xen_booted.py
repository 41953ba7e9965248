"""Booted: a hung command under the real xen-scsifront (Xen 4.17 in QEMU, PV dom0 running
``python3 -m bridge.cli serve`` from this checkout, a PV domU).

Before the domU sees its disk, dom0 adds a fault rule through the CLI: the first READ of
LBAs 1000-1007 hangs and ignores ABORT TASK (``--abort-fails``). The domU sets a 5 s
command timeout and reads LBA 1000. Linux's SCSI error handler then sends
VSCSIIF_ACT_SCSI_ABORT (the bridge: ABORT TASK, answered FUNCTION REJECTED -> the backend
answers the abort failed), escalates to VSCSIIF_ACT_SCSI_RESET (LOGICAL UNIT RESET, which
ends the hung READ, DID_RESET, and succeeds), retries the READ (the rule is spent) and the
dd completes; a fio crc32c verify afterwards ends with zero errors. The domU's kernel log
(SCSI error-recovery logging on) and the bridge's log of the same TMFs are printed.
"""

from __future__ import annotations

import json
import re

import pytest

from harness.xen import run_xen

pytestmark = pytest.mark.booted

SOCK = "/tmp/bridge-domu/control.sock"

DOM0_SCRIPT = rf"""
set -u
export DOMU_FIO=1
truncate -s 64M /tmp/disk0.img
bridge_start /vscsi/run/bridge.log domu /tmp/disk0.img $((64 << 20)) || exit 10
bridge_cli fault add disk0 hang --op read --lba 1000-1007 --count 1 --abort-fails --socket {SOCK} || exit 11
dom=$(domu_create domu /vscsi/run/guest.sh) || exit 12
xl unpause domu
domu_wait_booted domu 600 || exit 13
bridge_attach "$dom" 0 0 >/dev/null || exit 14
domu_wait_gone domu 900
echo "domU rc: $(domu_rc domu)"
echo "--- fault list ---"
bridge_cli fault list --socket {SOCK}
echo "FAULTS-JSON $(bridge_cli fault list --json --socket {SOCK} | tr -d '\n')"
echo "STATS-JSON $(bridge_cli stats --json --socket {SOCK} | tr -d '\n')"
bridge_stop; echo "bridge exit $?"
echo "--- bridge log ---"
grep -E 'TMF |fault rule|aborting task' /vscsi/run/bridge.log | sed 's/^/BRIDGE /'
grep -v ' DEBUG ' /vscsi/run/bridge.log | tail -40 | sed 's/^/BRIDGELOG /'
[ "$(domu_rc domu)" = 0 ]
"""

GUEST_SCRIPT = r"""
i=0
while [ ! -e /dev/sda ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/sda ] || { echo "GUEST no /dev/sda"; exit 1; }
sleep 1
echo 5 > /sys/block/sda/device/timeout
echo 6 > /proc/sys/dev/scsi/logging_level   # SCSI_LOG_ERROR_RECOVERY: levels below 6
dmesg -c >/dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/sda of=/dev/null bs=4096 skip=125 count=1 iflag=direct 2>/tmp/dd.err
echo "GUEST dd rc=$? after $(awk "BEGIN {print $(cut -d' ' -f1 /proc/uptime) - $t0}") s"
echo 0 > /proc/sys/dev/scsi/logging_level
dmesg -c | sed 's/^/GUEST-DMESG /'
fio --name=verify --filename=/dev/sda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --iodepth=8 --size=2M --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.out 2>&1
echo "GUEST fio rc=$?"
grep -E 'err=' /tmp/fio.out | sed 's/^/GUEST-FIO /'
dmesg -c | sed 's/^/GUEST-DMESG /'
exit 0
"""


async def test_hung_command_abort_then_reset_through_xen_scsifront() -> None:
    result = await run_xen(DOM0_SCRIPT, files={"guest.sh": GUEST_SCRIPT}, timeout=1800)
    script = result.script_output
    guest = result.domu_console("domu").replace("\r", "")
    dmesg = [line for line in guest.splitlines() if line.startswith("GUEST-DMESG ")]
    bridge = [line for line in script.splitlines() if line.startswith("BRIDGE ")]
    print("\n===== domU kernel log =====")
    print("\n".join(dmesg))
    print("\n".join(line for line in guest.splitlines() if line.startswith(("GUEST ", "GUEST-FIO"))))
    print("===== bridge log =====")
    print("\n".join(bridge))
    print(f"(Xen run {result.seconds:.0f} s)")
    print("\n".join(line for line in script.splitlines() if "-JSON " in line or "BRIDGELOG" in line))
    assert result.rc == 0, result.describe()
    assert re.search(r"GUEST dd rc=0 after", guest), guest[-4000:]
    assert "GUEST fio rc=0" in guest and re.search(r"GUEST-FIO .*err= 0", guest), guest[-4000:]

    tmfs = [line for line in bridge if "TMF " in line and re.search(r": [A-Z_]+( \[|$)", line)]
    outcome = [re.search(r"TMF (\w+) .*: (\w+)", line).groups() for line in tmfs]
    assert outcome[:2] == [("ABORT_TASK", "FUNCTION_REJECTED"),
                           ("LOGICAL_UNIT_RESET", "FUNCTION_COMPLETE")], tmfs
    assert any("aborting task" in line for line in bridge), bridge

    faults = json.loads(re.search(r"^FAULTS-JSON (.*)$", script, re.M).group(1))
    assert faults[0]["hits"] == 1 and faults[0]["hung"] == 0 and faults[0]["spent"], faults
    stats = json.loads(re.search(r"^STATS-JSON (.*)$", script, re.M).group(1))
    tm = stats["logical_units"]["disk0"]["task_management"]
    assert tm["ABORT_TASK"] == {"FUNCTION_REJECTED": 1}, tm
    assert tm["LOGICAL_UNIT_RESET"] == {"FUNCTION_COMPLETE": 1}, tm
    assert stats["logical_units"]["disk0"]["errors_by_kind"].get("TASK_ABORTED_BY_RESET") == 1, stats
