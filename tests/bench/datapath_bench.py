"""Microbenchmark (not a test): CPU per 4 KiB READ(10) through the whole KVM data path.

VirtioScsiPciDevice (virtqueue, descriptor walk, virtio-scsi framing, MSI-X) in
front of a real Target on a page-cached raw image, driven in-process by the
Linux-like fake driver of tests/unit/virtio/fakes.py: the driver keeps QD chains
posted, kicks only when the device asks for it (EVENT_IDX avail_event), waits for
the queue's MSI-X eventfd, reaps the used ring and re-posts, as virtio_scsi does.

Prints CPU microseconds per request (time.process_time), in all and without the
fake driver's own posting/reaping work (what remains is device + target + the trio
loop's wake-ups; a few process_time calls per batch, well under 1 us, are included);
the machine is shared, so wall-clock figures are not reported.
For repeatable figures run it under callgrind with two counts and subtract:

    python tests/bench/datapath_bench.py [--qd 1 32] [--requests 20000]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python tests/bench/datapath_bench.py --qd 32 --requests 2000 --no-warmup
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import random
import struct
import sys
import tempfile
import time

import trio
import trio.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from bridge.scsi.logical_unit import LogicalUnitSpec  # noqa: E402
from bridge.scsi.request import InitiatorPort, ScsiRequest
from bridge.scsi.target import Target  # noqa: E402
from bridge.virtio.scsi_device import VirtioScsiPciDevice  # noqa: E402
from bridge.virtio.scsi_wire import lun_to_virtio
from bridge.virtio.virtqueue import vring_need_event  # noqa: E402
from tests.unit.virtio.fakes import Driver, FakeDma  # noqa: E402

IMAGE_SIZE = 64 << 20
IO = 4096
BLOCK = 512
INITIATOR = InitiatorPort("iqn.2026-11.org.bench:datapath")
RQ = 2  # first request queue
REQ_LEN = 19 + 32  # virtio_scsi_cmd_req with the default cdb_size
RESP_LEN = 12 + 96  # virtio_scsi_cmd_resp with the default sense_size
_U16 = struct.Struct("<H")
_REQ = struct.Struct("<8sQBBB10s")  # lun, tag, task_attr, prio, crn, READ(10)
_READ10 = struct.Struct(">BBIBHB")


def make_image(directory: str) -> str:
    path = os.path.join(directory, "datapath.img")
    with open(path, "wb") as f:
        for i in range(IMAGE_SIZE // IO):
            f.write(struct.pack("<Q", i) * (IO // 8))  # each 4 KiB block holds its number
    with open(path, "rb") as f:  # every page in the page cache
        while f.read(1 << 20):
            pass
    return path


async def run_qd(drv: Driver, dma: FakeDma, qd: int, count: int, rng: random.Random
                 ) -> tuple[float, float]:
    """Complete ``count`` READs keeping ``qd`` in flight; returns CPU seconds used in all
    and by the fake driver's own work (posting chains, reaping the used ring)."""
    dq = drv.queues[RQ]
    lun = lun_to_virtio(0)
    nblocks = IO // BLOCK
    max_block = IMAGE_SIZE // IO
    slots = [(dma.alloc(REQ_LEN), dma.alloc(RESP_LEN), dma.alloc(IO, 4096)) for _ in range(qd)]
    free = list(range(qd))
    by_head: dict[int, tuple[int, int]] = {}  # head -> (slot, block read)
    irq_fd = drv.irq_fds[RQ + 1]  # queue_msix_vector = queue + 1 (fakes.Driver.init)
    mem = dma.mem
    posted = done = 0
    tag = 0
    clock = time.process_time
    driver_cpu = 0.0
    cpu0 = clock()
    while done < count:
        t0 = clock()
        old = dq.avail_idx
        while free and posted < count:
            slot = free.pop()
            req, resp, data = slots[slot]
            block = rng.randrange(max_block)
            tag += 1
            cdb = _READ10.pack(0x28, 0, block * nblocks, 0, nblocks, 0)
            _REQ.pack_into(mem, req, lun, tag, 0, 0, 0, cdb)
            head = drv.add_chain(RQ, [(req, REQ_LEN)], [(resp, RESP_LEN), (data, IO)])
            by_head[head] = (slot, block)
            posted += 1
        driver_cpu += clock() - t0
        # virtio 1.2 2.7.10: notify only when the device's avail_event was passed
        if dq.avail_idx != old and vring_need_event(drv.avail_event(RQ), dq.avail_idx, old):
            drv.kick(RQ)
        await trio.lowlevel.wait_readable(irq_fd)
        os.eventfd_read(irq_fd)
        t0 = clock()
        while True:
            used = drv.used(RQ)
            for head, written in used:
                slot, block = by_head.pop(head)
                req, resp, data = slots[slot]
                status, response = mem[resp + 10], mem[resp + 11]
                if response or status or written != RESP_LEN + IO:
                    raise SystemExit(f"READ failed: response {response} status {status:#x} "
                                     f"written {written}")
                if struct.unpack_from("<Q", mem, data + IO - 8)[0] != block:
                    raise SystemExit(f"READ of block {block} returned other data")
                free.append(slot)
            done += len(used)
            # like virtqueue_enable_cb: ask for the next interrupt, re-check the ring
            drv.set_used_event(RQ, dq.last_used)
            if _U16.unpack_from(mem, dq.used + 2)[0] == dq.last_used:
                break
        driver_cpu += clock() - t0
    return clock() - cpu0, driver_cpu


async def one_command(drv: Driver, dma: FakeDma, cdb: bytes, data_out: bytes = b"",
                      data_in: int = 0) -> tuple[int, int, bytes, bytes]:
    """One command through the device: (response, status, sense, data-in)."""
    req, resp = dma.alloc(REQ_LEN), dma.alloc(RESP_LEN)
    _REQ.pack_into(dma.mem, req, lun_to_virtio(0), 99, 0, 0, 0, cdb.ljust(10, b"\0"))
    out, into = [(req, REQ_LEN)], [(resp, RESP_LEN)]
    if data_out:
        buf = dma.alloc(len(data_out))
        dma.write(buf, data_out)
        out.append((buf, len(data_out)))
    if data_in:
        din = dma.alloc(data_in)
        into.append((din, data_in))
    drv.add_chain(RQ, out, into)
    drv.kick(RQ)
    irq_fd = drv.irq_fds[RQ + 1]
    with trio.move_on_after(10) as waited:
        await trio.lowlevel.wait_readable(irq_fd)
    if waited.cancelled_caught:
        raise SystemExit(f"no interrupt for CDB {cdb.hex()}")
    os.eventfd_read(irq_fd)
    if len(drv.used(RQ)) != 1:
        raise SystemExit("expected exactly one used element")
    drv.set_used_event(RQ, drv.queues[RQ].last_used)  # interrupt for the next one
    sense_len, _resid, _sq, status, response = struct.unpack_from("<IIHBB", dma.mem, resp)
    return (response, status, dma.read(resp + 12, sense_len),
            dma.read(din, data_in) if data_in else b"")


async def check_paths(drv: Driver, dma: FakeDma) -> None:
    """The paths the READ loop does not take: an error answered at once, a command the
    target finishes in a task (INQUIRY), a WRITE read back."""
    beyond = IMAGE_SIZE // BLOCK
    response, status, sense, _ = await one_command(drv, dma, _READ10.pack(0x28, 0, beyond, 0, 1, 0),
                                                  data_in=BLOCK)
    if response or status != 2 or sense[2] & 0xF != 5 or sense[12] != 0x21:
        raise SystemExit(f"READ beyond capacity: response {response} status {status} "
                         f"sense {sense.hex()}")
    response, status, _, data = await one_command(drv, dma, bytes((0x12, 0, 0, 0, 36, 0)),
                                                  data_in=36)
    if response or status or data[8:16] != b"VSCSIBRG":
        raise SystemExit(f"INQUIRY: response {response} status {status} data {data.hex()}")
    block = 5
    original = struct.pack("<Q", block) * (IO // 8)
    pattern = os.urandom(IO)
    for content in (pattern, original):
        write = _READ10.pack(0x2A, 0, block * (IO // BLOCK), 0, IO // BLOCK, 0)
        response, status, _, _ = await one_command(drv, dma, write, data_out=content)
        read = _READ10.pack(0x28, 0, block * (IO // BLOCK), 0, IO // BLOCK, 0)
        r2, s2, _, data = await one_command(drv, dma, read, data_in=IO)
        if response or status or r2 or s2 or data != content:
            raise SystemExit("WRITE then READ did not return the data written")
    print("checked: CHECK CONDITION answered at once, INQUIRY in a task, WRITE read back")


async def main_async(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = make_image(d)
        target = Target([LogicalUnitSpec(name="bench", path=path)], {INITIATOR.name: {0: "bench"}})
        try:
            # consume the POWER ON unit attention
            await target.execute(ScsiRequest(lun=0, tag=0, cdb=bytes(6),
                                             initiator=INITIATOR))
            async with trio.open_nursery() as nursery:
                dma = FakeDma(size=16 << 20)
                dev = VirtioScsiPciDevice(target, INITIATOR)
                dev.attach(nursery, dma)
                drv = Driver(dev, dma)
                drv.init()
                await trio.testing.wait_all_tasks_blocked()
                await check_paths(drv, dma)
                rng = random.Random(1)
                print(f"4 KiB random READ(10), page-cached {IMAGE_SIZE >> 20} MiB image, "
                      f"{args.requests} requests per queue depth")
                for qd in args.qd:
                    if args.warmup:
                        await run_qd(drv, dma, qd, min(args.requests, 2000), rng)
                    prof = cProfile.Profile() if args.profile else None
                    if prof:
                        prof.enable()
                    doorbells, fired = dev.doorbells, dev.pci.msix.fired
                    cpu, driver_cpu = await run_qd(drv, dma, qd, args.requests, rng)
                    if prof:
                        prof.disable()
                    n = args.requests
                    print(f"QD{qd:<3}: {cpu / n * 1e6:6.1f} CPU us/request in all, "
                          f"{(cpu - driver_cpu) / n * 1e6:6.1f} without the fake driver's "
                          f"posting/reaping (device + target + trio loop); "
                          f"{(dev.doorbells - doorbells) / n:.3f} doorbells and "
                          f"{(dev.pci.msix.fired - fired) / n:.3f} interrupts per request")
                    if prof:
                        pstats.Stats(prof).sort_stats(args.profile).print_stats(args.top)
                drv.close()
                dev.detach()
                nursery.cancel_scope.cancel()
        finally:
            target.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qd", type=int, nargs="+", default=[1, 32])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--profile", choices=["tottime", "cumulative"], default=None,
                   help="cProfile the measured run and print the top functions")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--dir", default=None, help="directory for the image (default: $TMPDIR)")
    trio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
