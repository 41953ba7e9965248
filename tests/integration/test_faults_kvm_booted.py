"""Fault injection seen by a booted Linux guest (QEMU 11 over vfio-user to a real ``serve``),
driven only through the CLI.

- a READ hung during fio's crc32c verify pass, with a 5 s guest timeout: Linux 6.1's
  virtio_scsi answers every SCSI timeout with "reset the timer" (virtscsi_eh_timed_out),
  so no ABORT TASK ever comes from a virtio-scsi guest; the guest resets the LU itself
  (``sg_reset -d``: LOGICAL UNIT RESET), the reset ends the hung READ (virtio RESET),
  Linux retries it and fio ends with zero errors. (The ABORT TASK -> FUNCTION REJECTED ->
  reset escalation is exercised with xen-scsifront, tests/integration/test_faults_xen_booted.py);
- a MEDIUM ERROR range: ``critical medium error`` at that sector in the guest's kernel log,
  ``dd`` stops with an error exactly there (the sectors before it are read);
- BUSY: the guest retries and its read succeeds.

The guest's kernel log and the bridge's log of the same events are printed one after the
other (``-s``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import trio

from bridge.control.pytest_plugin import RunningBridge, start_bridge
from harness.guest import REPO, guest_session

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"
MEDIUM_LBA = 40000  # 512-byte blocks: the guest's sectors are the LBAs


async def cli(bridge: RunningBridge, *args: str) -> str:
    proc = await trio.run_process([sys.executable, "-m", "bridge.cli", *args, "--socket",
                                   bridge.control_socket], capture_stdout=True,
                                  capture_stderr=True, check=False, cwd=REPO)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout.decode()


async def guest_ok(guest, script: str, timeout: float = 120) -> str:
    r = await guest.run(script, timeout=timeout)
    assert r.rc == 0, f"{script}\n{r.output}\n{guest.console.text[-3000:]}"
    return r.output


def bridge_lines(bridge: RunningBridge, since: int) -> list[str]:
    return [line for line in bridge.log()[since:].splitlines()
            if re.search(r"TMF |fault rule|aborting task", line)]


def show(title: str, guest_log: str, bridge_log: list[str]) -> None:
    print(f"\n===== {title}: guest kernel log =====")
    print(guest_log.rstrip())
    print(f"===== {title}: bridge log =====")
    print("\n".join(bridge_log))


# fio writes 2 MiB at random and verifies it (crc32c) while a watcher resets the LU from
# the guest (sg_reset -d: Linux's eh_device_reset_handler, virtio-scsi's LOGICAL UNIT RESET
# TMF) once no I/O of sda has completed for 8 s with I/O in flight: a hung command.
FIO_WITH_WATCHER = r"""
fio --name=verify --filename=/dev/sda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --iodepth=8 --size=2M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --group_reporting >/tmp/fio.out 2>&1 &
fpid=$!
stuck=0; last=-1; n=0
while kill -0 $fpid 2>/dev/null; do
    set -- $(cat /sys/block/sda/stat)
    done_ios=$(($1 + $5)); inflight=$9
    if [ "$inflight" -gt 0 ] && [ "$done_ios" = "$last" ]; then stuck=$((stuck + 1)); else stuck=0; fi
    last=$done_ios
    if [ $stuck -eq 8 ]; then
        echo "hung: no I/O completed for 8 s, in_flight=$inflight, timeout=$(cat /sys/block/sda/device/timeout) s"
        dmesg | grep -c ' abort' | sed 's/^/guest aborts so far: /'
        sg_reset -d /dev/sda; echo "sg_reset rc=$?"
    fi
    sleep 1; n=$((n + 1)); [ $n -gt 500 ] && echo "watcher gave up" && break
done
wait $fpid; echo "fio rc=$?"
grep -E 'err=|IOPS' /tmp/fio.out
dmesg -c
"""


@pytest.mark.booted
async def test_guest_under_faults(run_dir: Path) -> None:
    bridge = await trio.to_thread.run_sync(start_bridge, run_dir, None)
    try:
        async with guest_session(attach="vfio-user", socket=bridge.socket("vm1.sock"),
                                 fio=True) as guest:
            await guest_ok(guest, "vscsi_wait_disks 1 60 && echo 5 > /sys/block/sda/device/timeout"
                                  " && cat /sys/block/sda/device/timeout && dmesg -c >/dev/null")

            # 1. A READ hangs during fio's verify pass. Linux's virtio_scsi never times a
            # command out (its eh_timed_out resets the timer), so the 5 s timeout sends no
            # ABORT TASK; the guest resets the LU itself (sg_reset -d), the reset ends the
            # hung READ (virtio RESET), Linux retries it and fio verifies with zero errors.
            mark = len(bridge.log())
            await cli(bridge, "fault", "add", "disk0", "hang", "--op", "read", "--lba", "0-4095",
                      "--count", "1")
            out = await guest_ok(guest, FIO_WITH_WATCHER, timeout=700)
            lines = bridge_lines(bridge, mark)
            show("hung READ, LOGICAL UNIT RESET from the guest", out, lines)
            assert "hung: no I/O completed" in out and "sg_reset rc=0" in out, out
            assert "guest aborts so far: 0" in out, out
            assert "fio rc=0" in out and re.search(r"err= 0", out), out
            assert re.search(r"sd 0:0:0:0: device reset", out), out
            assert any(re.search(r"TMF LOGICAL_UNIT_RESET .*: FUNCTION_COMPLETE", x)
                       for x in lines), lines
            assert not any("TMF ABORT_TASK" in x for x in lines), lines
            rules = json.loads(await cli(bridge, "fault", "list", "--json"))
            assert rules[0]["hits"] == 1 and rules[0]["hung"] == 0, rules
            stats = json.loads(await cli(bridge, "stats", "--json"))
            tm = stats["initiators"][VM1]["task_management"]
            assert tm == {"LOGICAL_UNIT_RESET": {"FUNCTION_COMPLETE": 1}}, tm
            assert stats["initiators"][VM1]["errors_by_kind"].get("TASK_ABORTED_BY_RESET") == 1
            await cli(bridge, "fault", "clear")

            # 2. A MEDIUM ERROR range: the guest sees it at exactly that sector. dd reads one
            # 512-byte sector per command: the 4 before the range arrive, then the error
            # (Linux 6.1 reports BLK_STS_MEDIUM to dd as ENODATA, "No data available").
            mark = len(bridge.log())
            await cli(bridge, "fault", "add", "disk0", "medium_error", "--op", "read", "--lba",
                      f"{MEDIUM_LBA}-{MEDIUM_LBA + 7}")
            r = await guest.run(f"dd if=/dev/sda of=/tmp/md bs=512 skip={MEDIUM_LBA - 4} count=16 "
                                "iflag=direct; echo dd-rc=$?; echo bytes=$(wc -c < /tmp/md); dmesg -c",
                                timeout=120)
            show("medium error", r.output, bridge_lines(bridge, mark))
            assert "dd-rc=1" in r.output and "bytes=2048" in r.output, r.output
            assert "dd: /dev/sda: No data available" in r.output, r.output
            assert re.search(rf"critical medium error, dev sda, sector {MEDIUM_LBA} ", r.output), r.output
            assert "Add. Sense: Unrecovered read error" in r.output, r.output
            assert f"CDB: Read(10) 28 00 00 00 {MEDIUM_LBA >> 8:02x} {MEDIUM_LBA & 0xFF:02x}" in r.output
            await cli(bridge, "fault", "clear")

            # 3. BUSY: retried by the guest until the rule is spent.
            await cli(bridge, "fault", "add", "disk0", "busy", "--op", "read", "--count", "5")
            out = await guest_ok(guest, "dd if=/dev/sda of=/dev/null bs=4096 skip=300 count=1 "
                                        "iflag=direct && echo dd-ok")
            assert "dd-ok" in out, out
            rules = json.loads(await cli(bridge, "fault", "list", "--json"))
            assert rules[0]["hits"] == 5 and rules[0]["spent"], rules
            stats = json.loads(await cli(bridge, "stats", "--json"))
            assert stats["logical_units"]["disk0"]["errors_by_kind"]["BUSY"] == 5
            await cli(bridge, "fault", "clear")
    finally:
        code = await trio.to_thread.run_sync(bridge.stop)
        print(bridge.log()[-2000:])
    assert code == 0
