"""The demo behind images/demo.sh: the bridge serves a booted guest on its default configuration."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import cache_dir  # noqa: E402
from harness.guest import run_guest  # noqa: E402

# VSCSI_QEMU, VSCSI_KERNEL and VSCSI_INITRD replace the built QEMU and guest (harness.guest).
CACHE = cache_dir() / "demo"

GUEST_SCRIPT = r"""
vscsi_wait_disks 1 || exit 1
echo "== SCSI devices (lsscsi-style, from sysfs)"
vscsi_lsscsi
dev=$(ls /sys/class/scsi_disk | head -n1)
disk=/dev/$(ls /sys/class/scsi_disk/$dev/device/block)
sg=/dev/$(ls /sys/class/scsi_disk/$dev/device/scsi_generic)
echo "== sg_inq $sg"
sg_inq $sg
echo "== sg_vpd --page=di $sg"
sg_vpd --page=di $sg
echo "== sg_readcap -l $sg"
sg_readcap -l $sg
echo "== write 1 MiB at offset 8 MiB and read it back"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=1 2>/dev/null
dd if=/tmp/pattern of=$disk bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || exit 2
dd if=$disk of=/tmp/readback bs=1M skip=8 count=1 iflag=direct 2>/dev/null || exit 3
if cmp /tmp/pattern /tmp/readback; then echo "read back: identical"; else echo "read back: DIFFERENT"; exit 4; fi
"""


async def main() -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    ready = CACHE / "ready"
    ready.unlink(missing_ok=True)
    print(f"[demo] starting vscsi-bridge (default configuration, cache {CACHE})", flush=True)
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve", "--demo", "--cache-dir", str(CACHE), "--ready-file", str(ready)],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if bridge.poll() is not None or time.monotonic() > deadline:
                print("[demo] the bridge did not start", file=sys.stderr)
                return 1
            await trio.sleep(0.1)
        print("[demo] booting a Linux guest attached over vfio-user (this takes a minute under TCG)", flush=True)
        result = await run_guest(GUEST_SCRIPT, attach="vfio-user", socket=CACHE / "run" / "demo.sock", timeout=600)
        print(result.output, flush=True)
        print(f"[demo] guest booted in {result.boot_seconds:.1f} s, script exit status {result.rc}", flush=True)
        return result.rc
    finally:
        bridge.send_signal(signal.SIGTERM)
        try:
            bridge.wait(timeout=10)
        except subprocess.TimeoutExpired:
            bridge.kill()
        print("[demo] bridge stopped", flush=True)


if __name__ == "__main__":
    sys.exit(trio.run(main))
