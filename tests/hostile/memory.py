"""Memory of a real ``vscsi-bridge serve`` with N attached vfio-user guests.

Used by test_memory_budget.py (the per-attachment budget, pass/fail) and by
tests/bench/memory_bench.py (the figures). Each attachment is served as
kvm_bench serves its guest (2 request queues of 256 entries, one LU) and has a
client connected as QEMU + Linux would make it (client.VirtioGuest: VERSION,
guest RAM in a sealed memfd mapped with DMA_MAP, MSI-X eventfds, the virtio-scsi
driver's queues set up and DRIVER_OK), which then does a few 4 KiB READ(10)s, so
that every per-connection structure exists (session, DMA map, virtqueues, the
device's queue workers).

Figures are from /proc/<pid>/status: VmRSS, and RssAnon (the bridge's own heap and
stacks). RssShmem is guest RAM the bridge touched through its DMA mapping (rings,
buffers); it is the guest's memory, shared, and is reported apart.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.hostile.client import VirtioGuest

REPO = Path(__file__).resolve().parents[2]
GUEST_RAM = 1 << 20  # each client's guest RAM (memfd, DMA_MAP'd by the bridge)
READS = 8  # 4 KiB READ(10)s per client once attached

_LU = """
[bridge]
state_dir = "{run}"
log_level = "warning"

[[lu]]
name = "disk"
path = "disk.img"
size = "16MiB"
"""
_ATTACHMENT = """
[[vfio_user]]
socket = "g{i}.sock"
num_queues = 2
queue_size = 256
luns = {{ 0 = "disk" }}
"""


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


def _settle(pid: int) -> dict[str, int]:
    """The process's memory once it stopped moving (a few samples, the last)."""
    last = status_kib(pid)
    for _ in range(10):
        time.sleep(0.1)
        now = status_kib(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) < 64:
            return now
        last = now
    return last


def measure(attachments: int) -> dict[str, dict[str, int]]:
    """Start serve with ``attachments`` vfio-user sockets; memory (KiB) once ready with
    nothing connected ("idle"), and with a guest attached to every socket ("attached")."""
    with tempfile.TemporaryDirectory(prefix="vscsi-mem-") as d, ExitStack() as stack:
        run = Path(d)
        cfg = run / "bridge.toml"
        cfg.write_text(_LU.format(run=run)
                       + "".join(_ATTACHMENT.format(i=i) for i in range(attachments)))
        ready = run / "ready"
        log = (run / "bridge.log").open("wb")
        stack.callback(log.close)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "serve", "--config", str(cfg),
             "--ready-file", str(ready)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)})

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        stack.callback(stop)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start:\n"
                                   + (run / "bridge.log").read_text(errors="replace"))
            time.sleep(0.05)
        idle = _settle(proc.pid)
        for i in range(attachments):
            guest = VirtioGuest(str(run / f"g{i}.sock"), ram_size=GUEST_RAM)
            stack.callback(guest.close)
            guest.command(bytes(6))  # TEST UNIT READY: takes the POWER ON unit attention
            for n in range(READS):
                response, status, _ = guest.command(
                    struct.pack(">BBIBHB", 0x28, 0, n * 8, 0, 8, 0), data_in=4096)
                if response or status:
                    raise RuntimeError(f"guest {i}: READ answered {response}/{status:#x}")
        attached = _settle(proc.pid)
        return {"idle": idle, "attached": attached}


def per_attachment_kib(small: dict[str, dict[str, int]], large: dict[str, dict[str, int]],
                       n_small: int, n_large: int, key: str = "RssAnon") -> float:
    """What one more attached guest costs, from two runs."""
    return (large["attached"][key] - small["attached"][key]) / (n_large - n_small)
