"""Malformed descriptor chains: FAILURE or NEEDS_RESET, never an exception, and service goes on."""

from __future__ import annotations

import struct

import pytest

from bridge.vfio_user.device import DmaError
from bridge.virtio.pci import STATUS_NEEDS_RESET
from bridge.virtio.scsi_wire import VirtioScsiResponse
from bridge.virtio.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

from .fakes import MEM_SIZE, FakeDma, settle
from .test_scsi_device import RESP_LEN, RQ, Guest, cmd_req, parse_resp

R, W, N, I = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT  # noqa: E741
RO_START, RO_END = 0x300000, 0x310000


def setup_bufs(g: Guest) -> tuple[int, int, int]:
    req = g.dma.alloc(51)
    g.dma.write(req, cmd_req(b"\x00"))
    resp = g.dma.alloc(RESP_LEN)
    g.dma.write(resp, b"\xee" * RESP_LEN)
    data = g.dma.alloc(4096)
    return req, resp, data


def table(g: Guest, entries: list[tuple[int, int, int, int]]) -> int:
    t = g.dma.alloc(16 * len(entries), 16)
    for k, e in enumerate(entries):
        g.dma.write(t + 16 * k, struct.pack("<QIHH", *e))
    return t


# Each case writes descriptors 0.. of the request queue and returns whether a
# FAILURE response is expected in ``resp`` (True) or NEEDS_RESET (False).
def case_data_outside_memory(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W | N, 2)
    g.drv.write_desc(RQ, 2, MEM_SIZE - 16, 4096, W)
    return True


def case_loop(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W | N, 2)
    g.drv.write_desc(RQ, 2, data, 512, W | N, 1)  # back to 1: a loop
    return True


def case_next_out_of_range(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W | N, 999)
    return True


def case_writable_before_readable(g, req, resp, data):
    g.drv.write_desc(RQ, 0, resp, RESP_LEN, W | N, 1)
    g.drv.write_desc(RQ, 1, req, 51, R)
    return True


def case_nested_indirect(g, req, resp, data):
    inner = table(g, [(req, 51, R, 0)])
    t = table(g, [(req, 51, R | N, 1), (resp, RESP_LEN, W | N, 2), (inner, 16, I, 0)])
    g.drv.write_desc(RQ, 0, t, 48, I)
    return True


def case_indirect_loop(g, req, resp, data):
    t = table(g, [(req, 51, R | N, 1), (resp, RESP_LEN, W | N, 2), (data, 8, W | N, 1)])
    g.drv.write_desc(RQ, 0, t, 48, I)
    return True


def case_bad_indirect_len(g, req, resp, data):
    t = table(g, [(req, 51, R | N, 1), (resp, RESP_LEN, W, 0)])
    g.drv.write_desc(RQ, 0, t, 17, I)  # not a multiple of 16: nothing usable
    return False


def case_indirect_table_outside_memory(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W | N, 2)
    g.drv.write_desc(RQ, 2, MEM_SIZE + 4096, 32, I)
    return True


def case_response_in_read_only_memory(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, RO_START, RESP_LEN, W)  # device must not write there
    return False


def case_data_in_read_only_memory(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W | N, 2)
    g.drv.write_desc(RQ, 2, RO_START, 512, W)
    return True


def case_no_writable_at_all(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 51, R)
    return False


def case_short_header(g, req, resp, data):
    g.drv.write_desc(RQ, 0, req, 20, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W)
    return True


def case_chain_over_max_sectors(g, req, resp, data):
    # issue 15 item 5: more data than max_sectors x 512 (1 MiB) plus the headers
    g.drv.write_desc(RQ, 0, req, 51, R | N, 1)
    g.drv.write_desc(RQ, 1, resp, RESP_LEN, W | N, 2)
    g.drv.write_desc(RQ, 2, 0x100000, 0x110000, W)
    return True


CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
async def test_hostile_chain(nursery, case):
    # max_sectors 2048 (1 MiB) so that a chain over it fits the fake's 4 MiB of memory
    g = Guest(nursery, ro=(RO_START, RO_END), queue_size=8, max_sectors=2048)
    g.drv.init()
    dq = g.drv.queues[RQ]
    dq.free = list(range(3, 8))  # descriptors 0-2 are the hostile chain's
    req, resp, data = setup_bufs(g)
    expect_failure = case(g, req, resp, data)
    g.drv.publish(RQ, 0)
    g.drv.kick(RQ)
    await settle()
    used = g.drv.used(RQ)
    assert [u[0] for u in used] == [0]  # the chain is returned either way
    assert not g.target.requests  # nothing reached the target
    assert g.dev.guest_errors == 1
    if expect_failure:
        assert parse_resp(g.dma.read(resp, RESP_LEN))["response"] == VirtioScsiResponse.FAILURE
        assert not g.drv.status() & STATUS_NEEDS_RESET
    else:
        assert g.drv.status() & STATUS_NEEDS_RESET
        assert g.drv.interrupts(0) == 1  # configuration change interrupt
    # the device still serves the next good request on the same queue
    r, _, used = await g.run_cmd(b"\x00")
    assert r["response"] == VirtioScsiResponse.OK and len(used) == 1
    assert len(g.target.requests) == 1


async def test_avail_index_jump_breaks_queue_until_reset(nursery):
    g = Guest(nursery, queue_size=8)
    g.drv.init()
    dq = g.drv.queues[RQ]
    g.dma.write(dq.avail + 2, struct.pack("<H", 100))  # 100 new entries in an 8-entry ring
    g.drv.kick(RQ)
    await settle()
    assert g.drv.status() & STATUS_NEEDS_RESET
    assert not g.drv.used(RQ) and not g.target.requests
    # the driver resets and sets up again: served
    g.drv.init()
    r, _, used = await g.run_cmd(b"\x00")
    assert r["response"] == VirtioScsiResponse.OK and len(used) == 1
    assert not g.drv.status() & STATUS_NEEDS_RESET


async def test_head_index_out_of_range(nursery):
    g = Guest(nursery, queue_size=8)
    g.drv.init()
    g.drv.publish(RQ, 4000)
    g.drv.kick(RQ)
    await settle()
    assert g.drv.status() & STATUS_NEEDS_RESET and not g.drv.used(RQ)


async def test_ring_outside_memory_needs_reset(nursery):
    g = Guest(nursery, queue_size=8)
    g.drv.init()
    g.drv.common_write("device_status", 0)
    assert g.drv.negotiate(g.drv.device_features())
    g.drv.common_write("queue_select", RQ)
    g.drv.common_write("queue_desc", MEM_SIZE)
    g.drv.common_write("queue_enable", 1)
    g.drv.common_write("device_status", 0xF)
    g.drv.kick(RQ)
    await settle()
    assert g.drv.status() & STATUS_NEEDS_RESET


async def test_hostile_control_and_event_chains(nursery):
    g = Guest(nursery, queue_size=8)
    g.drv.init()
    # control request without a response buffer, then an unknown type
    req = g.dma.alloc(24)
    g.dma.write(req, struct.pack("<II8sQ", 0, 0, bytes(8), 0))
    g.drv.add_chain(0, [(req, 24)], [])
    bad = g.dma.alloc(24)
    g.dma.write(bad, struct.pack("<I", 77) + bytes(20))
    resp = g.dma.alloc(1)
    g.drv.add_chain(0, [(bad, 24)], [(resp, 1)])
    g.drv.kick(0)
    await settle()
    assert len(g.drv.used(0)) == 2
    assert g.dma.read(resp, 1)[0] == VirtioScsiResponse.FAILURE
    assert g.drv.status() & STATUS_NEEDS_RESET
    assert not g.target.tmfs
    # an event buffer too small is returned empty, the next good one gets the event
    from bridge.scsi.events import LunAdded

    small = g.dma.alloc(4)
    good = g.dma.alloc(16)
    g.drv.add_chain(1, [], [(small, 4)])
    g.drv.add_chain(1, [], [(good, 16)])
    g.drv.kick(1)
    g.target.emit(LunAdded("iqn.2026-11.test:guest", 9))
    await settle()
    assert [u[1] for u in g.drv.used(1)] == [0, 16]
    assert g.dma.read(good, 16)[7] == 9  # lun[3] of the event


async def test_head_reposted_while_in_flight_is_flagged(nursery):
    import trio

    g = Guest(nursery, queue_size=8)
    g.drv.init()
    g.target.hold = trio.Event()
    head, resp, _ = g.post_cmd(b"\x00")
    g.drv.kick(RQ)
    await settle()
    g.drv.publish(RQ, head)  # the same chain again, still in flight
    g.drv.kick(RQ)
    await settle()
    assert g.dev.guest_errors == 1
    g.target.hold.set()
    await settle()
    assert [u[0] for u in g.drv.used(RQ)] == [head, head]  # both answered, nothing breaks
    r, _, used = await g.run_cmd(b"\x00")
    assert r["response"] == VirtioScsiResponse.OK and len(used) == 1


async def test_event_delivery_is_bounded_against_reposted_bad_buffers(nursery, monkeypatch):
    """Issue 15 item 8: a guest that re-posts every
    malformed event buffer as soon as it comes back cannot keep one delivery going."""
    from bridge.scsi.events import LunAdded
    from bridge.virtio.scsi_wire import VIRTIO_SCSI_T_EVENTS_MISSED
    from bridge.virtio.virtqueue import SplitVirtqueue

    g = Guest(nursery, queue_size=8)
    g.drv.init()
    await settle()
    reposts = 0
    push = SplitVirtqueue.push

    def push_and_repost(vq, head, written):
        nonlocal reposts
        push(vq, head, written)
        if vq is g.dev.events.vq and written == 0 and reposts < 1000:
            reposts += 1  # a vCPU puts the same bad buffer back at once
            g.drv.publish(1, head)

    monkeypatch.setattr(SplitVirtqueue, "push", push_and_repost)
    small = g.dma.alloc(4)
    g.drv.add_chain(1, [], [(small, 4)])
    g.target.emit(LunAdded("iqn.2026-11.test:guest", 9))
    assert reposts <= 8  # one ring's worth (queue size 8), not 1000
    assert g.dev.events.missed
    monkeypatch.setattr(SplitVirtqueue, "push", push)
    # the last re-posted bad buffer is still there; behind it a good one gets the loss reported
    good = g.dma.alloc(16)
    g.drv.add_chain(1, [], [(good, 16)])
    g.drv.kick(1)
    await settle()
    ev = struct.unpack_from("<I", g.dma.read(good, 4))[0]
    assert ev == VIRTIO_SCSI_T_EVENTS_MISSED


class PagedDma(FakeDma):
    """Guest memory as one DMA map per 4 KiB page: a hostile client's many small maps."""

    def __init__(self) -> None:
        super().__init__()
        self.built = 0  # views made for the device

    def views(self, iova: int, length: int, writable: bool, limit: int | None = None
              ) -> list[memoryview]:
        out = []
        while length > 0:
            if limit is not None and len(out) >= limit:
                raise DmaError("more DMA maps than allowed")
            n = min(length, 4096 - iova % 4096)
            out.append(self.view(iova, n, writable))
            self.built += 1
            iova += n
            length -= n
        return out


async def test_chain_crossing_many_dma_maps_is_refused_before_its_views(nursery):
    """Issue 15 item 5: descriptors within the byte budget but each crossing many maps."""
    g = Guest(nursery, queue_size=8)  # seg_max 6: at most 2 * (6 + 2) views per chain
    g.dma = g.drv.dma = PagedDma()
    g.dev.detach()
    g.dev.attach(nursery, g.dma)
    g.drv.init()
    await settle()
    req, resp, data = setup_bufs(g)
    big = g.dma.alloc(64 << 10, 4096)
    # 2 headers + 8 data-in descriptors of 64 KiB (16 maps each): 512 KiB, 130 views
    entries = [(req, 51, R | N, 1), (resp, RESP_LEN, W | N, 2)]
    entries += [(big, 64 << 10, W | N, k + 3) for k in range(8)]
    entries[-1] = (big, 64 << 10, W, 0)
    g.drv.write_desc(RQ, 0, table(g, entries), 16 * len(entries), I)
    g.drv.queues[RQ].free = list(range(1, 8))
    g.dma.built = 0
    g.drv.publish(RQ, 0)
    g.drv.kick(RQ)
    await settle()
    assert [u[0] for u in g.drv.used(RQ)] == [0]
    assert parse_resp(g.dma.read(resp, RESP_LEN))["response"] == VirtioScsiResponse.FAILURE
    assert not g.target.requests
    assert g.dma.built <= 16


def test_server_dma_views_stop_at_the_limit():
    """The server's DmaSpace builds no more views than the chain's budget has left."""
    import os

    from bridge.vfio_user.dma import DmaSpaceImpl

    dma = DmaSpaceImpl()
    fd = os.memfd_create("vscsi-test-views")
    try:
        os.ftruncate(fd, 16 * 4096)
        for k in range(16):
            dma.map(k * 4096, 4096, True, True, fd, k * 4096)
    finally:
        os.close(fd)
    assert len(dma.views(0, 16 * 4096, True)) == 16
    assert len(dma.views(0, 4 * 4096, True, 4)) == 4
    with pytest.raises(DmaError):
        dma.views(0, 16 * 4096, True, 4)
    dma.unmap_all()
