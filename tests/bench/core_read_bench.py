"""Microbenchmark (not a test): 4 KiB READ(10)s through Target.submit on a page-cached image.

Prints requests/s and CPU microseconds per request (time.process_time, all threads) for
reads served inline with RWF_NOWAIT versus reads sent to a worker thread; and for 4 KiB
WRITE(10)s: inline RWF_NOWAIT (where the kernel supports it), inline timed pwritev, and
worker thread, which is how the write path choice in bridge/scsi/backing.py was made.

--cold: 4 KiB READ(10)s that miss the page cache (a 256 MiB image evicted with
posix_fadvise(DONTNEED) before each pass, reads spread over all of it), read after the
RWF_NOWAIT miss with Linux AIO on the O_DIRECT descriptor versus in a worker thread. Printed
with the figures: the share of requests whose first RWF_NOWAIT attempt missed, and of those
read with AIO or in a thread (the rest hit on read_into's second attempt: the first miss
started a buffered read of the page, which may have finished by then).

Requests go through ``Target.submit``, the entry point the transports use (a response at
once, else a coroutine to await), with statistics enabled as ``serve`` runs it
(``--no-stats``: without). ``--requests N --only read``: exactly N inline READs and nothing
else, for instruction counts (callgrind at two values of N, subtract):

    python tests/bench/core_read_bench.py [--seconds 3] [--concurrency 1] [--cold [--dir D]]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python tests/bench/core_read_bench.py --only read --requests 20000
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import random
import struct
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from bridge.scsi import aio  # noqa: E402
from bridge.scsi.logical_unit import LogicalUnitSpec  # noqa: E402
from bridge.scsi.request import InitiatorPort, ScsiRequest, ScsiResponse, ServiceResponse  # noqa: E402
from bridge.scsi.target import Target  # noqa: E402

IMAGE_SIZE = 64 << 20
COLD_IMAGE_SIZE = 256 << 20
IO = 4096
INITIATOR = "iqn.2026-11.org.bench:initiator"


def make_image(directory: str, size: int = IMAGE_SIZE, cached: bool = True) -> str:
    path = os.path.join(directory, "bench.img")
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    if cached:
        with open(path, "rb") as f:  # pre-read: every page in the page cache
            while f.read(1 << 20):
                pass
    return path


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def run_mode(target: Target, op: int, seconds: float, concurrency: int,
                   image_size: int = IMAGE_SIZE, requests: int = 0) -> tuple[float, float]:
    """(requests/s, CPU us per request); ``requests`` > 0: stop after that many instead of
    after ``seconds``."""
    nblocks = IO // 512
    max_lba = image_size // 512 - nblocks
    rng = random.Random(1)
    count = 0
    tag = 0

    async def worker() -> None:
        nonlocal count, tag
        view = memoryview(mmap.mmap(-1, IO))  # page-aligned, like guest memory
        ini = InitiatorPort(INITIATOR)
        lun = 0
        submit = target.submit
        while (count < requests) if requests else (time.perf_counter() < deadline):
            lba = rng.randrange(0, max_lba // 8) * 8
            tag += 1
            cdb = struct.pack(">BBIBHB", op, 0, lba, 0, nblocks, 0)
            if op == 0x28:
                req = ScsiRequest(lun=lun, tag=tag, cdb=cdb, initiator=ini, data_in=[view])
            else:
                req = ScsiRequest(lun=lun, tag=tag, cdb=cdb, initiator=ini, data_out=[view])
            resp = submit(req)  # as the transports do: a response now, or a coroutine
            if type(resp) is not ScsiResponse:
                resp = await resp
            if resp.status or resp.response is not ServiceResponse.COMMAND_COMPLETE:
                raise SystemExit(f"request failed: {resp}")
            count += 1
            if not count % 64:
                await trio.lowlevel.checkpoint()  # let the other workers run

    # warm up + consume the POWER ON unit attention
    await target.execute(ScsiRequest(lun=0, tag=0, cdb=bytes(6),
                                     initiator=InitiatorPort(INITIATOR)))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = wall0 + seconds
    async with trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(worker)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return count / wall, cpu / count * 1e6


async def cold_reads(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp") as d:
        path = make_image(d, COLD_IMAGE_SIZE, cached=False)
        target = Target([LogicalUnitSpec(name="bench", path=path)], {INITIATOR: {0: "bench"}})
        backing = target.logical_unit("bench").backing
        direct_fd = backing.direct_fd
        misses = via_aio = via_thread = 0
        real_read_into, real_preadv_all, real_aio = backing.read_into, backing._preadv_all, aio.preadv

        async def counting_read_into(offset, views):  # called when read_inline missed
            nonlocal misses
            misses += 1
            await real_read_into(offset, views)

        def counting_preadv_all(views, offset, flags):
            nonlocal via_thread
            via_thread += not flags
            return real_preadv_all(views, offset, flags)

        async def counting_aio(*a, **k):
            nonlocal via_aio
            n = await real_aio(*a, **k)  # counted when submitted (not AioFallback)
            via_aio += 1
            return n

        backing._preadv_all = counting_preadv_all  # type: ignore[method-assign]
        aio.preadv = counting_aio
        backing.read_into = counting_read_into  # type: ignore[method-assign]
        try:
            print(f"4 KiB random READ(10)s, cold {COLD_IMAGE_SIZE >> 20} MiB image in {d}, "
                  f"concurrency {args.concurrency}, {args.seconds:.0f} s each")
            if direct_fd is None:
                print("  (O_DIRECT refused here: both rows use the thread path)")
            rows = [("miss -> worker thread     ", None, True),
                    ("miss -> Linux AIO O_DIRECT", direct_fd, True)] * 2
            # No RWF_NOWAIT attempt at all: every request takes the miss path (no buffered
            # read started by a failed attempt, no second chance to hit).
            rows += [("no probe: worker thread   ", None, False),
                     ("no probe: Linux AIO       ", direct_fd, False)]
            for label, fd, probe in rows:
                backing.direct_fd = fd
                backing.nowait_reads = probe
                evict(path)
                misses = via_aio = via_thread = 0
                t0 = time.perf_counter()
                rps, cpu_us = await run_mode(target, 0x28, args.seconds, args.concurrency,
                                             COLD_IMAGE_SIZE)
                count = rps * (time.perf_counter() - t0)
                print(f"{label}: {rps:7.0f} requests/s  {1e6 / rps * args.concurrency:7.0f} us/request"
                      f"  {cpu_us:6.1f} CPU us/request  (not inline {misses / max(count, 1):.0%}:"
                      f" then AIO {via_aio / max(count, 1):.0%}, thread {via_thread / max(count, 1):.0%})")
        finally:
            aio.preadv = real_aio
            backing.direct_fd = direct_fd
            backing.nowait_reads = True
            target.close()


async def main_async(args: argparse.Namespace) -> None:
    if args.cold:
        await cold_reads(args)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = make_image(d)
        target = Target([LogicalUnitSpec(name="bench", path=path)], {INITIATOR: {0: "bench"}})
        if args.stats:
            target.enable_statistics()
        lu = target.logical_unit("bench")
        direct_fd = lu.backing.direct_fd
        try:
            print(f"4 KiB random requests on a page-cached {IMAGE_SIZE >> 20} MiB image "
                  f"through Target.submit, statistics {'on' if args.stats else 'off'}, "
                  f"concurrency {args.concurrency}, "
                  + (f"{args.requests} requests" if args.requests else f"{args.seconds:.0f} s")
                  + " each")
            rows = [
                ("READ(10)  inline RWF_NOWAIT", 0x28, True),
                ("READ(10)  worker thread    ", 0x28, False),
                ("WRITE(10) inline RWF_NOWAIT", 0x2A, "nowait"),
                ("WRITE(10) inline timed     ", 0x2A, "inline"),
                ("WRITE(10) worker thread    ", 0x2A, False),
            ]
            if args.only == "read":
                rows = rows[:1]
            for label, op, nowait in rows:
                if op == 0x28:
                    lu.backing.nowait_reads = nowait
                    # the thread row: no direct (AIO) reads either
                    lu.backing.direct_fd = None if not nowait else direct_fd
                else:
                    lu.backing.nowait_writes = nowait == "nowait"
                    lu.backing.inline_writes = nowait == "inline"
                rps, cpu_us = await run_mode(target, op, args.seconds, args.concurrency,
                                             requests=args.requests)
                note = ""
                if op == 0x2A and nowait == "nowait" and not lu.backing.nowait_writes:
                    note = "  (kernel refused RWF_NOWAIT writes: EOPNOTSUPP, fell back to threads)"
                print(f"{label}: {rps:9.0f} requests/s  {cpu_us:7.1f} CPU us/request{note}")
        finally:
            lu.backing.direct_fd = direct_fd
            target.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--dir", default=None,
                   help="directory for the image (default: $TMPDIR; /var/tmp with --cold)")
    p.add_argument("--cold", action="store_true", help="page-cache misses: AIO vs thread")
    p.add_argument("--requests", type=int, default=0,
                   help="a fixed number of requests per row instead of --seconds")
    p.add_argument("--only", choices=["read"], default=None,
                   help="read: the inline READ row only")
    p.add_argument("--no-stats", dest="stats", action="store_false",
                   help="without the statistics serve keeps")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
