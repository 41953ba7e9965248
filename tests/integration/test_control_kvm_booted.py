"""A booted KVM guest changed only from outside, through the control CLI.

``vscsi-bridge serve`` runs as its own process with one LU mapped at LUN 0 for one
vfio-user guest. While the guest runs, ``vscsi-bridge lu add`` creates a new sparse
LU, ``lun map`` maps it at LUN 1 (the guest sees a new disk without a rescan: virtio
TRANSPORT_RESET/RESCAN), ``lu resize`` grows it (PARAM_CHANGE 2Ah/09h: the guest's
block device grows), ``lun unmap`` removes it (TRANSPORT_RESET/REMOVED: the disk is
gone), ``lu remove`` drops it. All that while fio with crc32c verify runs on LUN 0.
``stats`` counts exactly the reads fio made on the new LU; ``pr show`` / ``pr clear``
see and drop a registration the guest made with sg_persist. Every CLI call's output is
printed (pytest -s): a transcript of the session.
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


async def cli(bridge: RunningBridge, *args: str, rc: int = 0) -> str:
    proc = await trio.run_process([sys.executable, "-m", "bridge.cli", *args, "--socket",
                                   bridge.control_socket], capture_stdout=True,
                                  capture_stderr=True, check=False, cwd=REPO)
    assert proc.returncode == rc, (args, proc.stdout, proc.stderr)
    out = proc.stdout.decode() + proc.stderr.decode()
    if "--json" not in args:
        print(f"$ vscsi-bridge {' '.join(args)}\n{out}", end="" if out.endswith("\n") else "\n")
    return out


# On LUN 0 for the whole session: 4 KiB random writes then a crc32c verify, time based.
FIO_BACKGROUND = (
    "fio --name=bg --filename=/dev/sda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k "
    "--iodepth=8 --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 --time_based "
    "--runtime=40 --verify_backlog=256 >/tmp/bg.out 2>&1; echo rc=$? >>/tmp/bg.out &")


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
        async with guest_session(attach="vfio-user", socket=bridge.socket("vm1.sock"),
                                 fio=True) as guest:
            out = await guest_wait(guest, "[ -e /sys/block/sda ]", "LUN 0")
            assert out.count("type=0") == 1, out
            st = json.loads(await cli(bridge, "status", "--json"))
            assert st["attachments"][0]["connected"] is True
            r = await guest.run(FIO_BACKGROUND)
            assert r.rc == 0, r.output

            await cli(bridge, "lu", "add", "hot", str(run_dir / "hot.img"), "--size", "32MiB")
            await cli(bridge, "lun", "map", "vm1.sock", "1", "hot")
            out = await guest_wait(guest, "[ -e /sys/bus/scsi/devices/0:0:0:1/block ]", "LUN 1 added")
            assert re.search(r"^\[0:0:0:1\] type=0 .* 33554432$", out, re.MULTILINE), out

            await cli(bridge, "lu", "resize", "hot", "48MiB")
            dev = "$(ls /sys/bus/scsi/devices/0:0:0:1/block)"
            out = await guest_wait(guest, f"[ $(cat /sys/block/{dev}/size) -eq {48 * MiB // 512} ]",
                                   "LUN 1 grown")
            assert re.search(r"^\[0:0:0:1\] type=0 .* 50331648$", out, re.MULTILINE), out
            # stats since a reset count exactly what fio did on the new LU
            await cli(bridge, "stats", "--reset")
            r = await guest.run(
                f"fio --name=count --filename=/dev/{dev} --direct=1 --ioengine=libaio "
                "--rw=randread --bs=4k --iodepth=4 --size=32M --io_size=2M "
                "--output-format=json >/tmp/count.json && "
                # the job's "read" section comes first: its io_bytes and total_ios
                "grep -m2 -E '\"(io_bytes|total_ios)\" :' /tmp/count.json")
            assert r.rc == 0, r.output
            fio_ios = int(re.search(r'"total_ios" : (\d+)', r.output).group(1))
            fio_bytes = int(re.search(r'"io_bytes" : (\d+)', r.output).group(1))
            stats = json.loads(await cli(bridge, "stats", "--json"))
            hot = stats["logical_units"]["hot"]
            assert (hot["commands"]["read"], hot["bytes_read"]) == (fio_ios, fio_bytes), (hot, r.output)
            assert fio_ios == 512 and hot["commands"]["write"] == 0, hot
            await cli(bridge, "stats")

            # a registration the guest makes is what pr show reads, and pr clear drops it
            r = await guest.run(f"sg_persist -n --out --register --param-sark=0xabc1 /dev/{dev}")
            assert r.rc == 0, r.output
            shown = json.loads(await cli(bridge, "pr", "show", "hot", "--json"))["hot"]
            assert [int(k["key"], 16) for k in shown["registrants"]] == [0xABC1], shown
            await cli(bridge, "pr", "show", "hot")
            await cli(bridge, "pr", "clear", "hot")
            r = await guest.run(f"sg_persist -n -k /dev/{dev}; sg_persist -n -k /dev/{dev}")
            assert "no registered reservation keys" in r.output.lower() or \
                "there are no registered" in r.output.lower(), r.output

            await cli(bridge, "lun", "unmap", "vm1.sock", "1")
            out = await guest_wait(guest, "[ ! -e /sys/bus/scsi/devices/0:0:0:1 ]", "LUN 1 removed")
            assert "0:0:0:1" not in out and "[0:0:0:0]" in out, out
            await cli(bridge, "lu", "remove", "hot")
            assert [lu["name"] for lu in json.loads(await cli(bridge, "lu", "list", "--json"))] == ["disk0"]
            await cli(bridge, "lu", "list")

            # an LU removed while fio runs on it: refused while mapped, then forced (the
            # guest loses the disk, its fio fails), and everything else goes on
            await cli(bridge, "lu", "add", "doomed", str(run_dir / "doomed.img"), "--size", "16MiB")
            await cli(bridge, "lun", "map", "vm1.sock", "2", "doomed")
            await guest_wait(guest, "[ -e /sys/bus/scsi/devices/0:0:0:2/block ]", "LUN 2 added")
            r = await guest.run(
                "d=$(ls /sys/bus/scsi/devices/0:0:0:2/block); (fio --name=doomed "
                "--filename=/dev/$d --direct=1 --ioengine=libaio --rw=randread --bs=4k "
                "--iodepth=8 --time_based --runtime=60 >/tmp/doomed.out 2>&1; "
                "echo rc=$? >>/tmp/doomed.out) & sleep 2; grep -c . /tmp/doomed.out || true")
            assert r.rc == 0, r.output
            refused = await cli(bridge, "lu", "remove", "doomed", rc=1)
            assert "mapped" in refused, refused
            await cli(bridge, "lu", "remove", "doomed", "--force")
            await guest_wait(guest, "[ ! -e /sys/bus/scsi/devices/0:0:0:2 ]", "LUN 2 removed")
            r = await guest.run("while ! grep -q '^rc=' /tmp/doomed.out; do usleep 500000; done; "
                                "tail -3 /tmp/doomed.out", timeout=120)
            assert "rc=0" not in r.output, r.output  # its disk went away under it
            assert [lu["name"] for lu in json.loads(await cli(bridge, "lu", "list", "--json"))] == ["disk0"]

            # the background fio on LUN 0 ran through all of it, verify clean
            r = await guest.run("while ! grep -q '^rc=' /tmp/bg.out; do usleep 500000; done; "
                                "cat /tmp/bg.out", timeout=120)
            assert "rc=0" in r.output and "err= 0" in r.output, r.output
    finally:
        code = await trio.to_thread.run_sync(bridge.stop)
        print(bridge.log()[-3000:])
    assert code == 0
