"""Benchmark (prints numbers, asserts nothing): vfio-user server message costs.

Run: /root/.cache/vscsi-venv/bin/python tests/unit/vfio_user/bench_server.py
A client process plays QEMU: posted 4-byte REGION_WRITEs (QEMU's doorbell
writes when no region is mmap'd), and synchronous REGION_WRITE round trips
(every write once any region is mmap'd). Server CPU is this process's time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile

import trio

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))

from bridge.vfio_user.device import REGION_FLAG_READ, REGION_FLAG_WRITE, IrqInfo, RegionInfo  # noqa: E402
from bridge.vfio_user.server import serve  # noqa: E402

N_POSTED = 50000
N_SYNC = 5000

CLIENT = r"""
import json, socket, struct, sys, time
path, n_posted, n_sync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX); s.connect(path)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b)); assert c; b += c
    return b
def call(cmd, payload, flags=0, mid=[0]):
    mid[0] = (mid[0] + 1) & 0xFFFF
    s.sendall(struct.pack("=HHIII", mid[0], cmd, 16 + len(payload), flags, 0) + payload)
    if flags & 0x10: return None
    h = exact(16); size = struct.unpack_from("=I", h, 4)[0]
    return exact(size - 16)
caps = json.dumps({"capabilities": {"max_msg_fds": 16, "write_multiple": True}}).encode()
call(1, struct.pack("=HH", 0, 0) + caps + b"\0")
w = struct.pack("=QII", 0x100, 0, 4) + b"\1\0\0\0"
t = time.perf_counter()
for _ in range(n_posted):
    call(10, w, 0x10)
call(9, struct.pack("=QII", 0x100, 0, 4))
posted = time.perf_counter() - t
lat = []
for _ in range(n_sync):
    t0 = time.perf_counter(); call(10, w); lat.append(time.perf_counter() - t0)
lat.sort()
print(json.dumps({"posted_s": posted, "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)],
                  "sync_s": sum(lat)}))
"""


class Regs:
    def __init__(self) -> None:
        self.bar0 = bytearray(0x1000)
        self.writes = 0

    def regions(self):
        return [RegionInfo(0x1000, REGION_FLAG_READ | REGION_FLAG_WRITE)] + [RegionInfo(0)] * 6 + [
            RegionInfo(256, REGION_FLAG_READ | REGION_FLAG_WRITE), RegionInfo(0)]

    def irqs(self):
        return [IrqInfo(0)] * 3

    def region_read(self, index, offset, count):
        return bytes(self.bar0[offset : offset + count])

    def region_write(self, index, offset, data):
        self.writes += 1

    def set_irq_eventfds(self, index, start, fds):
        pass

    def set_irq_mask(self, index, start, count, masked):
        pass

    def attach(self, nursery, dma):
        pass

    def detach(self):
        pass

    def reset(self):
        pass


async def main() -> None:
    dev = Regs()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, dev)
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            result = await trio.run_process(
                [sys.executable, "-c", CLIENT, path, str(N_POSTED), str(N_SYNC)],
                capture_stdout=True)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            nursery.cancel_scope.cancel()
    r = json.loads(result.stdout)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    n = N_POSTED + N_SYNC + 1
    print(f"posted REGION_WRITE: {N_POSTED / r['posted_s']:,.0f} msg/s "
          f"({r['posted_s'] / N_POSTED * 1e6:.1f} us each, client-paced)")
    print(f"sync REGION_WRITE round trip: p50 {r['p50'] * 1e6:.1f} us, "
          f"p99 {r['p99'] * 1e6:.1f} us")
    print(f"server CPU per message: {cpu / n * 1e6:.1f} us ({n} messages, {cpu:.2f} s)")
    assert dev.writes == N_POSTED + N_SYNC


if __name__ == "__main__":
    trio.run(main)
