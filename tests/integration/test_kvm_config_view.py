"""What a booted guest sees is what the configuration file says.

The bridge runs as its own process (``python -m bridge.cli serve --config``), as a
user runs it. The configuration gives this guest two LUs (LUN 0: 512-byte blocks
with a configured WWN and serial; LUN 3: 4096-byte blocks, read-only) and maps a
third LU to another initiator only. Inside the guest, Linux's virtio_scsi must bind,
find exactly LUNs 0 and 3 and nothing else, and sg_inq, sg_vpd (80h, 83h, B0h, B2h)
and sg_readcap -l must agree with the configuration.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from harness.guest import REPO, run_guest

WWN = "naa.6001405c0ffee0000000000000000001"
SERIAL = "CFGVIEW0"

CONFIG = """
[bridge]
state_dir = "{run}"

[[lu]]
name = "boot"
path = "boot.img"
size = "32MiB"
wwn = "{wwn}"
serial = "{serial}"

[[lu]]
name = "archive"
path = "archive.img"
size = "16MiB"
block_size = 4096
read_only = true

[[lu]]
name = "secret"
path = "secret.img"
size = "8MiB"

[[vfio_user]]
socket = "guest.sock"
initiator = "iqn.2026-11.org.example:viewer"
luns = {{ 0 = "boot", 3 = "archive" }}

[[vfio_user]]
socket = "other.sock"
initiator = "iqn.2026-11.org.example:other"
luns = {{ 0 = "secret" }}
"""

GUEST_SCRIPT = r"""
vscsi_wait_disks 2 60 || exit 1
sleep 1
echo "--- lsscsi"
vscsi_lsscsi
echo "--- count $(ls /sys/class/scsi_device | wc -l)"
for hctl in $(ls /sys/class/scsi_device); do
    sg=/dev/$(ls /sys/class/scsi_device/$hctl/device/scsi_generic)
    lun=${hctl##*:}
    echo "=== LUN $lun $sg"
    sg_inq $sg | grep -E 'identification|serial'
    sg_vpd --page=sn $sg
    sg_vpd --page=di $sg
    sg_vpd --page=bl $sg
    sg_vpd --page=lbpv $sg
    sg_readcap -l $sg
    echo "ro=$(cat /sys/class/scsi_device/$hctl/device/block/*/ro)"
done
"""


def section(out: str, lun: int) -> str:
    m = re.search(rf"^=== LUN {lun} .*?(?=^=== LUN |\Z)", out, re.MULTILINE | re.DOTALL)
    assert m, f"no output for LUN {lun}:\n{out}"
    return m.group(0)


@pytest.mark.booted
async def test_guest_sees_exactly_what_the_configuration_says(run_dir: Path) -> None:
    cfg = run_dir / "bridge.toml"
    cfg.write_text(CONFIG.format(run=run_dir, wwn=WWN, serial=SERIAL))
    ready = run_dir / "ready"
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve", "--config", str(cfg), "--ready-file", str(ready)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        with trio.fail_after(60):
            while not ready.exists():
                assert bridge.poll() is None, bridge.stdout.read() if bridge.stdout else ""
                await trio.sleep(0.1)
        result = await run_guest(GUEST_SCRIPT, attach="vfio-user", socket=run_dir / "guest.sock",
                                 timeout=400)
    finally:
        bridge.send_signal(signal.SIGTERM)
        try:
            log, _ = bridge.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            bridge.kill()
            log, _ = bridge.communicate()
    out = result.output
    print(out)
    assert bridge.returncode == 0, f"bridge did not stop cleanly on SIGTERM:\n{log}"
    assert result.rc == 0, result.console[-4000:]

    # exactly LUNs 0 and 3 of target 0: the other initiator's LU is invisible
    assert "--- count 2" in out, out
    luns = sorted(int(m) for m in re.findall(r"^\[\d+:0:0:(\d+)\] type=0 ", out, re.MULTILINE))
    assert luns == [0, 3], out
    assert re.search(r"^\[\d+:0:0:0\] type=0 VSCSIBRG vscsi-bridge \S+ /dev/sd\w /dev/sg\d+ 33554432$",
                     out, re.MULTILINE), out
    assert re.search(r"^\[\d+:0:0:3\] type=0 VSCSIBRG vscsi-bridge \S+ /dev/sd\w /dev/sg\d+ 16777216$",
                     out, re.MULTILINE), out

    lun0 = section(out, 0)
    assert f"Unit serial number: {SERIAL}" in lun0, lun0
    assert "0x" + WWN[4:] in lun0, lun0  # NAA-6 designator (VPD 83h) is the configured WWN
    assert "iqn.2026-11.org.vscsi-bridge:target" in lun0, lun0  # target port designator
    assert "Maximum transfer length:" in lun0 and "Maximum unmap LBA count:" in lun0, lun0  # B0h
    assert re.search(r"Unmap command supported \(LBPU\): 1", lun0), lun0  # B2h
    assert "Logical block length=512 bytes" in lun0, lun0
    assert "Number of logical blocks=65536" in lun0, lun0
    assert "lbpme=1" in lun0, lun0
    assert "ro=0" in lun0, lun0

    lun3 = section(out, 3)
    assert "Logical block length=4096 bytes" in lun3, lun3
    assert "Number of logical blocks=4096" in lun3, lun3
    assert "ro=1" in lun3, lun3  # read-only LU: MODE SENSE WP bit, so sd marks the disk ro
    serial3 = re.search(r"Unit serial number: (\S+)", lun3)
    assert serial3 and serial3.group(1) != SERIAL, lun3

    # the derived identity of the unconfigured LU was stored next to its image
    assert (run_dir / "archive.img.vscsi-id.json").exists()
