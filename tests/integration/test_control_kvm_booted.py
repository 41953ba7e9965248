"""A booted KVM guest changed only from outside, through the control CLI.

``vscsi-bridge serve`` runs as its own process with one LU mapped at LUN 0 for one
vfio-user guest. While the guest runs, ``vscsi-bridge lu add`` creates a new sparse
LU, ``lun map`` maps it at LUN 1 (the guest sees a new disk without a rescan: virtio
TRANSPORT_RESET/RESCAN), ``lu resize`` grows it (PARAM_CHANGE 2Ah/09h: the guest's
block device grows), ``lun unmap`` removes it (TRANSPORT_RESET/REMOVED: the disk is
gone). ``status`` shows the guest connected and ``stats`` counts the guest's reads.
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
MiB = 1 << 20


async def cli(bridge: RunningBridge, *args: str) -> str:
    proc = await trio.run_process([sys.executable, "-m", "bridge.cli", *args, "--socket",
                                   bridge.control_socket], capture_stdout=True,
                                  capture_stderr=True, check=False, cwd=REPO)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout.decode()


async def guest_wait(guest, condition: str, what: str, seconds: int = 90) -> str:
    r = await guest.run(
        f"n=0; until {condition}; do n=$((n+1)); [ $n -gt {seconds * 5} ] && exit 1; usleep 200000; done;"
        " vscsi_lsscsi", timeout=seconds + 30)
    assert r.rc == 0, f"guest never saw: {what}\n{r.output}\n{guest.console.text[-3000:]}"
    return r.output


@pytest.mark.booted
async def test_hot_add_grow_unmap_through_the_cli(run_dir: Path) -> None:
    bridge = await trio.to_thread.run_sync(start_bridge, run_dir, None)
    try:
        async with guest_session(attach="vfio-user", socket=bridge.socket("vm1.sock")) as guest:
            out = await guest_wait(guest, "[ -e /sys/block/sda ]", "LUN 0")
            assert out.count("type=0") == 1, out
            st = json.loads(await cli(bridge, "status", "--json"))
            assert st["attachments"][0]["connected"] is True

            await cli(bridge, "lu", "add", "hot", str(run_dir / "hot.img"), "--size", "32MiB")
            await cli(bridge, "lun", "map", "vm1.sock", "1", "hot")
            out = await guest_wait(guest, "[ -e /sys/bus/scsi/devices/0:0:0:1/block ]", "LUN 1 added")
            assert re.search(r"^\[0:0:0:1\] type=0 .* 33554432$", out, re.MULTILINE), out

            await cli(bridge, "lu", "resize", "hot", "48MiB")
            dev = "$(ls /sys/bus/scsi/devices/0:0:0:1/block)"
            out = await guest_wait(guest, f"[ $(cat /sys/block/{dev}/size) -eq {48 * MiB // 512} ]",
                                   "LUN 1 grown")
            assert re.search(r"^\[0:0:0:1\] type=0 .* 50331648$", out, re.MULTILINE), out
            r = await guest.run(f"dd if=/dev/{dev} of=/dev/null bs=64k count=16 iflag=direct")
            assert r.rc == 0, r.output

            stats = json.loads(await cli(bridge, "stats", "--json"))
            hot = stats["logical_units"]["hot"]
            assert hot["commands"]["read"] >= 16 and hot["bytes_read"] >= MiB, hot
            assert stats["initiators"][VM1]["commands"]["read"] >= 16

            await cli(bridge, "lun", "unmap", "vm1.sock", "1")
            out = await guest_wait(guest, "[ ! -e /sys/bus/scsi/devices/0:0:0:1 ]", "LUN 1 removed")
            assert "0:0:0:1" not in out and "[0:0:0:0]" in out, out
            await cli(bridge, "lu", "remove", "hot")
            assert [lu["name"] for lu in json.loads(await cli(bridge, "lu", "list", "--json"))] == ["disk0"]
    finally:
        code = await trio.to_thread.run_sync(bridge.stop)
        print(bridge.log()[-3000:])
    assert code == 0
