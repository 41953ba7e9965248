"""Shared-ring indexes are stored with one access: another process never sees a torn value.

A guest reads used->idx (virtio) or rsp_prod/req_event (Xen) while the bridge
writes them. struct.pack_into zeroes its bytes before writing them, so a
reader in another process could see 0 between two valid values; the driver
then takes stale ring entries as completions ("request:id N is not a head!")
or skips a notification. Here a reader process samples the words while this
process stores values that are never 0, and must never see 0.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import time
from pathlib import Path

from bridge.virtio.virtqueue import SplitVirtqueue
from bridge.xen.ring import BackRing, FrontRing, init_shared_ring
from bridge.xen.vscsiif import REQUEST_SIZE

PAGE = 4096
QSIZE = 8
DESC, AVAIL, USED = 0, 256, 512  # virtqueue areas in page 0
USED_IDX = USED + 2
AVAIL_EVENT = USED + 4 + 8 * QSIZE
XEN = PAGE  # the vscsiif shared ring is page 1
CONTROL = 2 * PAGE  # byte 0: reader armed, byte 1: stop

# (offset, size) of each watched word; the reader counts zeros seen after the word
# first held a non-zero value.
WORDS = [(USED_IDX, 2), (AVAIL_EVENT, 2), (XEN + 0, 4), (XEN + 4, 4), (XEN + 8, 4)]

READER = r"""
import mmap, sys
words = eval(sys.argv[2])
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
mv = memoryview(m)
views = [mv[off:off + size].cast("H" if size == 2 else "I") for off, size in words]
armed = [False] * len(views)
zeros = [0] * len(views)
reads = 0
mv[8192] = 1
while not mv[8193]:
    for k, v in enumerate(views):
        x = v[0]
        if x:
            armed[k] = True
        elif armed[k]:
            zeros[k] += 1
    reads += 1
print(reads, *zeros)
"""


class _FileDma:
    def __init__(self, view: memoryview) -> None:
        self._view = view

    def view(self, iova: int, length: int, writable: bool) -> memoryview:
        return self._view[iova:iova + length]


def test_index_stores_are_never_seen_torn(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    path.write_bytes(bytes(3 * PAGE))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
    mem = memoryview(m)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), repr(WORDS)],
                              stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not mem[CONTROL] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mem[CONTROL], "reader process did not start"
        page = mem[XEN:XEN + PAGE]
        init_shared_ring(page)
        front, back = FrontRing(page), BackRing(page)
        request = bytes(REQUEST_SIZE)
        rounds = 0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            # virtio: used->idx runs 1..60001 (never wraps to 0); avail_event = 1
            vq = SplitVirtqueue(_FileDma(mem), QSIZE, DESC, AVAIL, USED, event_idx=True,
                                indirect=True, position=(1, 1))
            vq.enable_notification()
            for _ in range(60000):
                vq.push(0, 4096)
            vq.release()
            # Xen: req_prod, req_event, rsp_prod advance from 1 and never wrap
            for _ in range(2000):
                front.put_request(request)
                front.push_requests_and_check_notify()
                back.take_requests()
                back.put_response(request)
                back.push_responses_and_check_notify()
                back.final_check_for_requests()
                front.take_responses()
            rounds += 1
        mem[CONTROL + 1] = 1
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    reads, *zeros = map(int, out.split())
    assert reads > 1000, f"the reader sampled only {reads} times"
    assert rounds >= 1
    names = ["used->idx", "avail_event", "req_prod", "req_event", "rsp_prod"]
    seen = {n: z for n, z in zip(names, zeros, strict=True) if z}
    assert not seen, f"torn index stores seen by another process ({reads} samples): {seen}"
