"""Benchmark (prints figures, asserts nothing): grant strategies on the simulated platform.

Runs the same workload through the backend with each strategy and prints,
per request: gntdev ioctls, mmaps, pages mapped, copy ioctls, bytes copied,
event-channel notifications, and the wall time in this process (the sim
does real mmap/munmap of memfd pages and real memcpy, so the time ratios
say something about syscall vs copy cost, not about Xen).

    /root/.cache/vscsi-venv/bin/python -m tests.unit.xen.bench_grant_strategies

"Persistent" mappings are not offered: vscsiif has no feature-persistent, and
xen-scsifront ends foreign access as soon as a response arrives (a grant still
mapped then disables the host), so a mapping can never outlive its request.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import trio

from bridge.xen.backend import BackendConfig
from bridge.xen.xenstore import open_xenstore
from tests.xen_sim.platform import SimXen
from tests.xen_sim.xenstored import SimXenstored

from .conftest import Env, make_target, running_backend
from .test_backend_io import clear_ua

WORKLOADS = [("4k randread qd1", 4096, 1, "r"), ("4k randread qd16", 4096, 16, "r"),
             ("4k randwrite qd16", 4096, 16, "w"),
             ("128k seqread qd4", 131072, 4, "r"), ("508k read qd2 (SG_GRANT)", 520192, 2, "r")]


async def run_one(tmp: Path, strategy: str, size: int, depth: int, rw: str, count: int) -> dict:
    async with trio.open_nursery() as nursery:
        target = make_target(tmp)
        xsd = SimXenstored(nursery)
        async with open_xenstore(await xsd.connect(0)) as xs0:
            env = Env(SimXen(), xsd, xs0, target, nursery)
            async with running_backend(env, config=BackendConfig(grant_strategy=strategy)) as (
                    _, fe, _):
                await clear_ua(fe)
                ops_before = dict(env.sim.grants.ops)
                notif_before = env.sim.evtchn.notifies
                blocks = size // 512
                payload = os.urandom(size)
                t0 = time.perf_counter()

                async def worker(k: int) -> None:
                    for i in range(k, count, depth):
                        lba = (i * blocks) % (4 * 1024 * 1024 // 512 - blocks)
                        if rw == "r":
                            cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
                            r = await fe.submit(cdb, data_in_len=size)
                        else:
                            cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)
                            r = await fe.submit(cdb, data_out=payload)
                        assert r.rslt == 0, r

                async with trio.open_nursery() as n:
                    for k in range(depth):
                        n.start_soon(worker, k)
                elapsed = time.perf_counter() - t0
                ops = {k: v - ops_before.get(k, 0) for k, v in env.sim.grants.ops.items()}
                ops["notifies"] = env.sim.evtchn.notifies - notif_before
        target.close()
        nursery.cancel_scope.cancel()
    return {"us_per_req": elapsed / count * 1e6, **{k: v / count for k, v in ops.items()}}


async def main(count: int) -> None:
    cols = ["map_ioctl", "mmap", "pages_mapped", "unmap_ioctl", "copy_ioctl", "bytes_copied",
            "notifies", "us_per_req"]
    print(f"{'workload':28} {'strategy':8} " + " ".join(f"{c:>12}" for c in cols))
    with tempfile.TemporaryDirectory() as d:
        for name, size, depth, rw in WORKLOADS:
            for strategy in ("map", "copy"):
                res = await run_one(Path(d), strategy, size, depth, rw, count)
                print(f"{name:28} {strategy:8} "
                      + " ".join(f"{res.get(c, 0):12.1f}" for c in cols))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 200)
