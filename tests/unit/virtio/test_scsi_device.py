"""virtio-scsi PCI device driven like Linux would, through registers and guest memory."""

from __future__ import annotations

import struct

import pytest
import trio

from bridge.scsi.events import CapacityChanged, LunAdded, LunRemoved
from bridge.scsi.request import REPORT_LUNS_WLUN, InitiatorPort
from bridge.virtio.pci import STATUS_NEEDS_RESET
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from bridge.virtio.scsi_wire import (
    TMF_SUBTYPES,
    VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
    VirtioScsiResponse,
    lun_to_virtio,
)

from .fakes import BLOCK, Driver, FakeDma, FakeTarget, MemfdDma, settle

INITIATOR = InitiatorPort("iqn.2026-11.test:guest")
RQ = 2  # first request queue
RESP_LEN = 12 + 96


def cmd_req(cdb: bytes, lun: int = 0, tag: int = 7) -> bytes:
    return lun_to_virtio(lun) + struct.pack("<QBBB", tag, 0, 0, 0) + cdb.ljust(32, b"\0")


def parse_resp(raw: bytes) -> dict:
    sense_len, resid, sq, status, response = struct.unpack_from("<IIHBB", raw, 0)
    return {"sense_len": sense_len, "resid": resid, "status": status, "response": response,
            "sense": raw[12 : 12 + sense_len]}


class Guest:
    def __init__(self, nursery: trio.Nursery, *, ro: tuple[int, int] = (0, 0),
                 dma: FakeDma | MemfdDma | None = None, **kw) -> None:
        self.dma = dma if dma is not None else FakeDma(ro=ro)
        self.target = FakeTarget()
        self.dev = VirtioScsiPciDevice(self.target, INITIATOR, **kw)
        self.dev.attach(nursery, self.dma)
        self.drv = Driver(self.dev, self.dma)

    def post_cmd(self, cdb: bytes, *, data_in: int = 0, data_out: bytes = b"", lun: int = 0,
                 indirect: bool = False, q: int = RQ) -> tuple[int, int, int]:
        req = self.dma.alloc(51)
        self.dma.write(req, cmd_req(cdb, lun))
        resp = self.dma.alloc(RESP_LEN)
        out = [(req, 51)]
        if data_out:
            buf = self.dma.alloc(len(data_out))
            self.dma.write(buf, data_out)
            out.append((buf, len(data_out)))
        into = [(resp, RESP_LEN)]
        din = 0
        if data_in:
            din = self.dma.alloc(data_in)
            into.append((din, data_in))
        head = self.drv.add_chain(q, out, into, indirect=indirect)
        return head, resp, din

    async def run_cmd(self, cdb: bytes, **kw) -> tuple[dict, bytes, list]:
        head, resp, din = self.post_cmd(cdb, **kw)
        q = kw.get("q", RQ)
        self.drv.kick(q)
        await settle()
        used = self.drv.used(q)
        data = self.dma.read(din, kw.get("data_in", 0)) if din else b""
        return parse_resp(self.dma.read(resp, RESP_LEN)), data, used


async def booted(nursery, **kw) -> Guest:
    g = Guest(nursery, **kw)
    g.drv.init()
    await settle()
    return g


READ10 = lambda lba, n: struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)  # noqa: E731
WRITE10 = lambda lba, n: struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)  # noqa: E731


async def test_test_unit_ready_and_interrupt(nursery):
    g = await booted(nursery)
    resp, _, used = await g.run_cmd(b"\x00")
    assert resp["response"] == VirtioScsiResponse.OK and resp["status"] == 0
    assert len(used) == 1 and used[0][1] == RESP_LEN
    assert g.drv.interrupts(RQ + 1) == 1  # queue q uses vector q+1 in the fake driver
    assert g.target.requests[0].initiator == INITIATOR
    assert bytes(g.target.requests[0].cdb[:1]) == b"\x00"
    # the request names the device's target port, with the byte limit the driver was
    # told (max_sectors x 512): the core's Block Limits page follows it
    port = g.target.requests[0].target_port
    assert port is g.dev.target_port and port.max_transfer_bytes == 512 * g.dev.max_sectors


@pytest.mark.parametrize("indirect", [False, True])
async def test_read_write_through_request_queue(nursery, indirect):
    g = await booted(nursery)
    payload = bytes(range(256)) * 4  # two blocks
    resp, _, used = await g.run_cmd(WRITE10(3, 2), data_out=payload, indirect=indirect)
    assert resp["status"] == 0 and resp["response"] == 0
    assert g.target.disk[3 * BLOCK : 5 * BLOCK] == payload
    resp, data, used = await g.run_cmd(READ10(3, 2), data_in=2 * BLOCK, indirect=indirect)
    assert resp["status"] == 0 and resp["resid"] == 0
    assert data == payload
    assert used[0][1] == RESP_LEN + 2 * BLOCK


async def test_data_buffers_are_views_of_guest_memory(nursery):
    g = await booted(nursery)
    g.target.hold = trio.Event()
    _, _, din = g.post_cmd(READ10(0, 1), data_in=BLOCK)
    g.drv.kick(RQ)
    await settle()
    view = g.target.requests[0].data_in[0]
    view[:4] = b"ABCD"  # writing through the view lands in guest memory: no copy
    assert g.dma.read(din, 4) == b"ABCD"
    g.target.hold.set()
    await settle()


async def test_check_condition_sense_and_residual(nursery):
    g = await booted(nursery)
    resp, _, _ = await g.run_cmd(b"\xff")  # unsupported opcode in the fake target
    assert resp["status"] == 2 and resp["sense_len"] == 18
    assert resp["sense"][2] == 0x05 and resp["sense"][12] == 0x20
    resp, data, _ = await g.run_cmd(b"\x12\x00\x00\x00\x60\x00", data_in=96)
    assert resp["resid"] == 96 - 36 and data[8:12] == b"FAKE"


async def test_sense_size_is_honoured(nursery):
    g = Guest(nursery)
    g.drv.init()
    g.drv.config_write(20, 8)  # sense_size = 8
    assert g.drv.config_read(20) == 8
    req = g.dma.alloc(51)
    g.dma.write(req, cmd_req(b"\xff"))
    resp = g.dma.alloc(20)
    g.drv.add_chain(RQ, [(req, 51)], [(resp, 20)])
    g.drv.kick(RQ)
    await settle()
    r = parse_resp(g.dma.read(resp, 20))
    assert r["status"] == 2 and r["sense_len"] == 8 and g.drv.used(RQ)[0][1] == 20


async def test_bidirectional_without_inout_fails(nursery):
    g = await booted(nursery)
    resp, _, used = await g.run_cmd(WRITE10(0, 1), data_out=bytes(BLOCK), data_in=BLOCK)
    # The core refuses it (SERVICE DELIVERY FAILURE); virtio says FAILURE (5.6.6.1.1).
    assert resp["response"] == VirtioScsiResponse.FAILURE
    assert g.target.requests[-1].data_in and g.target.requests[-1].data_out


async def test_bad_target_and_wlun(nursery):
    g = await booted(nursery)
    req = g.dma.alloc(51)
    g.dma.write(req, bytes((1, 3, 0x40, 0, 0, 0, 0, 0)) + bytes(43))  # target 3
    resp = g.dma.alloc(RESP_LEN)
    g.drv.add_chain(RQ, [(req, 51)], [(resp, RESP_LEN)])
    g.drv.kick(RQ)
    await settle()
    assert parse_resp(g.dma.read(resp, RESP_LEN))["response"] == VirtioScsiResponse.BAD_TARGET
    g.dma.write(req, bytes((1, 0, 0xC1, 1, 0, 0, 0, 0)) + bytes(43))  # REPORT LUNS W-LUN
    g.drv.add_chain(RQ, [(req, 51)], [(resp, RESP_LEN)])
    g.drv.kick(RQ)
    await settle()
    assert g.target.requests and g.target.requests[-1].lun == REPORT_LUNS_WLUN


async def test_event_idx_suppresses_interrupts(nursery):
    g = await booted(nursery)
    await g.run_cmd(b"\x00")
    assert g.drv.interrupts(RQ + 1) == 1
    # the device asks to be notified at the next avail index
    assert g.drv.avail_event(RQ) == 1
    g.drv.set_used_event(RQ, 5)  # driver wants an interrupt only after used idx passes 5
    for _ in range(3):
        await g.run_cmd(b"\x00")
    assert g.drv.interrupts(RQ + 1) == 0
    g.drv.set_used_event(RQ, 4)
    await g.run_cmd(b"\x00")  # used idx moves 4 -> 5: crosses used_event 4
    assert g.drv.interrupts(RQ + 1) == 1


async def test_no_interrupt_flag_without_event_idx(nursery):
    g = Guest(nursery)
    features = g.drv.device_features() & ~(1 << 29)
    g.drv.init(features)
    await settle()
    dq = g.drv.queues[RQ]
    g.dma.write(dq.avail, struct.pack("<H", 1))  # VIRTQ_AVAIL_F_NO_INTERRUPT
    resp, _, _ = await g.run_cmd(b"\x00")
    assert resp["response"] == 0 and g.drv.interrupts(RQ + 1) == 0
    g.dma.write(dq.avail, struct.pack("<H", 0))
    await g.run_cmd(b"\x00")
    assert g.drv.interrupts(RQ + 1) == 1


async def test_queue_depth_and_concurrency(nursery):
    g = Guest(nursery, queue_size=8)
    g.drv.init()
    g.target.hold = trio.Event()
    for _ in range(8):
        g.post_cmd(b"\x00", indirect=True)
    g.drv.kick(RQ)
    await settle()
    assert len(g.target.requests) == 8  # all in flight at once
    g.target.hold.set()
    await settle()
    assert len(g.drv.used(RQ)) == 8


async def test_multiple_request_queues(nursery):
    g = await booted(nursery, num_queues=3)
    for q in (2, 3, 4):
        resp, _, used = await g.run_cmd(b"\x00", q=q)
        assert resp["response"] == 0 and len(used) == 1
        assert g.drv.interrupts(q + 1) == 1


async def test_tmf_all_subtypes(nursery):
    g = await booted(nursery)
    for sub, function in TMF_SUBTYPES.items():
        req = g.dma.alloc(24)
        g.dma.write(req, struct.pack("<II8sQ", 0, sub, lun_to_virtio(0), 0x1234 + sub))
        resp = g.dma.alloc(1)
        g.dma.write(resp, b"\xee")
        g.drv.add_chain(0, [(req, 24)], [(resp, 1)])
        g.drv.kick(0)
        await settle()
        assert g.dma.read(resp, 1) == bytes((VirtioScsiResponse.OK,))
        tmf = g.target.tmfs[-1]
        assert tmf.function is function and tmf.lun == 0 and tmf.tag == 0x1234 + sub and tmf.initiator == INITIATOR
    # unknown subtype and wrong target
    for subtype, lun, expect in ((99, lun_to_virtio(0), VirtioScsiResponse.FUNCTION_REJECTED),
                                 (0, lun_to_virtio(0, target=1), VirtioScsiResponse.BAD_TARGET)):
        req = g.dma.alloc(24)
        g.dma.write(req, struct.pack("<II8sQ", 0, subtype, lun, 1))
        resp = g.dma.alloc(1)
        g.drv.add_chain(0, [(req, 24)], [(resp, 1)])
        g.drv.kick(0)
        await settle()
        assert g.dma.read(resp, 1)[0] == expect
    assert len(g.target.tmfs) == 8


async def test_async_notification_query_answered_honestly(nursery):
    g = await booted(nursery)
    for typ in (1, 2):
        req = g.dma.alloc(16)
        g.dma.write(req, struct.pack("<I8sI", typ, lun_to_virtio(0), 0xFFFF))
        resp = g.dma.alloc(5)
        g.dma.write(resp, b"\xff" * 5)
        g.drv.add_chain(0, [(req, 16)], [(resp, 5)])
        g.drv.kick(0)
        await settle()
        assert struct.unpack("<IB", g.dma.read(resp, 5)) == (0, VirtioScsiResponse.OK)


def post_event_buffers(g: Guest, n: int) -> list[int]:
    bufs = []
    for _ in range(n):
        b = g.dma.alloc(16)
        g.drv.add_chain(1, [], [(b, 16)])
        bufs.append(b)
    g.drv.kick(1)
    return bufs


async def test_hotplug_and_resize_events(nursery):
    g = await booted(nursery)
    bufs = post_event_buffers(g, 4)
    g.target.emit(LunAdded(INITIATOR.name, 3))
    g.target.emit(LunRemoved(INITIATOR.name, 300))
    g.target.emit(CapacityChanged(INITIATOR.name, 3))
    g.target.emit(LunAdded("iqn.other", 5))  # someone else's LUN map: not ours
    await settle()
    events = [struct.unpack("<I8sI", g.dma.read(b, 16)) for b in bufs]
    assert events[0] == (VIRTIO_SCSI_T_TRANSPORT_RESET, bytes((1, 0, 0, 3, 0, 0, 0, 0)),
                         VIRTIO_SCSI_EVT_RESET_RESCAN)
    assert events[1] == (VIRTIO_SCSI_T_TRANSPORT_RESET, bytes((1, 0, 0x41, 0x2C, 0, 0, 0, 0)),
                         VIRTIO_SCSI_EVT_RESET_REMOVED)
    assert events[2] == (VIRTIO_SCSI_T_PARAM_CHANGE, bytes((1, 0, 0, 3, 0, 0, 0, 0)), 0x092A)
    assert events[3] == (0, bytes(8), 0)
    assert [u[1] for u in g.drv.used(1)] == [16, 16, 16]
    assert g.drv.interrupts(2) >= 1


async def test_events_missed_when_no_buffer(nursery):
    g = await booted(nursery)
    g.target.emit(LunAdded(INITIATOR.name, 1))  # no buffer posted: lost
    bufs = post_event_buffers(g, 2)  # the kick reports the loss
    await settle()
    ev, _, _ = struct.unpack("<I8sI", g.dma.read(bufs[0], 16))
    assert ev == VIRTIO_SCSI_T_EVENTS_MISSED  # NO_EVENT | EVENTS_MISSED: the guest rescans
    g.target.emit(LunAdded(INITIATOR.name, 2))
    ev, lun, _ = struct.unpack("<I8sI", g.dma.read(bufs[1], 16))
    assert ev == VIRTIO_SCSI_T_TRANSPORT_RESET and lun[3] == 2


async def test_events_need_negotiated_features(nursery):
    g = Guest(nursery)
    g.drv.init(g.drv.device_features() & ~0b110)  # no HOTPLUG, no CHANGE
    bufs = post_event_buffers(g, 1)
    g.target.emit(LunAdded(INITIATOR.name, 1))
    g.target.emit(CapacityChanged(INITIATOR.name, 0))
    await settle()
    assert g.dma.read(bufs[0], 16) == bytes(16) and not g.drv.used(1)


async def test_reset_then_reinit_serves_again(nursery):
    g = await booted(nursery)
    await g.run_cmd(b"\x00")
    g.dev.reset()  # DEVICE_RESET from the client
    assert g.drv.status() == 0
    g.drv.init()
    resp, _, used = await g.run_cmd(b"\x00")
    assert resp["response"] == 0 and len(used) == 1


async def test_detach_keeps_state_and_reattach_resumes(nursery):
    g = await booted(nursery)
    await g.run_cmd(b"\x00")
    g.dev.detach()
    status = g.drv.status()
    g.post_cmd(b"\x00")
    g.dev.attach(nursery, g.dma)
    g.dev.set_irq_eventfds(2, 0, [__import__("os").dup(fd) for fd in g.drv.irq_fds])
    await settle()
    assert g.drv.status() == status
    assert len(g.drv.used(RQ)) == 1  # the chain posted while detached was served on reattach


async def test_buffer_spanning_two_dma_maps(nursery):
    from .fakes import SplitDma

    g = Guest(nursery)
    g.dma = SplitDma()
    g.dev.detach()
    g.dev.attach(nursery, g.dma)
    g.drv = type(g.drv)(g.dev, g.dma)
    g.drv.init()
    g.target.disk[0:BLOCK * 2] = bytes(range(256)) * 4
    req = g.dma.alloc(51)
    g.dma.write(req, cmd_req(READ10(0, 2)))
    resp = g.dma.alloc(RESP_LEN)
    din = g.dma.boundary - 100  # the data-in buffer crosses the boundary
    g.drv.add_chain(RQ, [(req, 51)], [(resp, RESP_LEN), (din, 2 * BLOCK)])
    g.drv.kick(RQ)
    await settle()
    assert parse_resp(g.dma.read(resp, RESP_LEN))["response"] == VirtioScsiResponse.OK
    assert g.dma.read(din, 2 * BLOCK) == bytes(range(256)) * 4
    assert len(g.target.requests[0].data_in) == 2  # two views, no copy


async def test_doorbells_suppressed_while_busy(nursery):
    g = await booted(nursery)
    g.target.hold = trio.Event()
    g.post_cmd(b"\x00")
    g.drv.kick(RQ)
    await settle()
    assert len(g.target.requests) == 1
    # one in flight: notifications stay on (queue depth 1 would save no doorbell)
    assert g.drv.avail_event(RQ) == 1
    g.post_cmd(b"\x00")
    g.drv.kick(RQ)
    await settle()
    assert len(g.target.requests) == 2
    # two in flight: avail_event stays behind, so a Linux driver would not kick for the next
    assert g.drv.avail_event(RQ) == 1
    g.post_cmd(b"\x00")  # no kick
    await trio.sleep(0.02)  # the busy poll interval (1 ms) finds it anyway
    assert len(g.target.requests) == 3
    g.post_cmd(b"\x00")  # no kick either: picked up when a request completes
    g.dev.busy_poll_interval = 3600
    await trio.sleep(0.002)
    await settle()
    g.target.hold.set()
    await settle()
    assert len(g.target.requests) == 4 and len(g.drv.used(RQ)) == 4
    assert g.drv.avail_event(RQ) == 4  # idle again: notifications re-enabled


async def test_polled_doorbells(nursery):
    from bridge.vfio_user.device import REGION_FLAG_MMAP

    g = Guest(nursery, doorbell="poll")
    bar4 = g.dev.regions()[4]
    assert bar4.flags & REGION_FLAG_MMAP and bar4.mmap_fd is not None
    assert bar4.sparse_areas == [(0x3000, 0x1000)]  # only the notify window is mapped
    assert __import__("os").fstat(bar4.mmap_fd).st_size == 0x4000
    g.drv.init()
    await settle()
    g.post_cmd(b"\x00")  # no kick: the guest's notify write would land in the memfd
    with trio.fail_after(2):
        while not g.drv.used(RQ):
            await trio.sleep(0.001)
    assert len(g.target.requests) == 1
    g.dev.detach()
    g.dev.close()
    assert g.dev.pci.notify_memfd is None


async def test_nexus_loss_on_driver_reset_and_disconnect(nursery):
    g = Guest(nursery)
    g.dev.reset()  # DEVICE_RESET before any driver ran (QEMU start): nothing to lose
    assert g.target.nexus_losses == []
    g.drv.init()  # the driver's own reset (status 0) comes before DRIVER_OK: still nothing
    await settle()
    assert g.target.nexus_losses == []
    g.drv.common_write("device_status", 0)  # guest reboot: the active driver resets
    assert g.target.nexus_losses == [INITIATOR.name]
    g.dev.detach()  # client gone
    assert g.target.nexus_losses == [INITIATOR.name] * 2


async def test_dma_unmap_and_remap_of_the_rings(nursery):
    """Issue 15 item 10: QEMU unmaps and maps again the memory holding the rings (it does
    at boot, while SeaBIOS left the device running): the unmap is answered with no view
    left into the region, and the rings are opened again at their positions after it."""
    dma = MemfdDma()
    try:
        g = Guest(nursery, dma=dma)
        g.drv.init()
        await settle()
        bufs = post_event_buffers(g, 2)
        await settle()
        r, _, used = await g.run_cmd(b"\x00")
        assert r["response"] == VirtioScsiResponse.OK and len(used) == 1
        dma.unmap(0, dma.size)
        assert dma.deferred_unmaps == 0 and not dma.unsettled  # nothing of it kept
        dma.remap()
        r, _, used = await g.run_cmd(b"\x00")
        assert r["response"] == VirtioScsiResponse.OK and len(used) == 1
        g.target.emit(LunAdded(INITIATOR.name, 3))
        assert struct.unpack_from("<I", dma.read(bufs[0], 4))[0] == VIRTIO_SCSI_T_TRANSPORT_RESET
        assert not g.drv.status() & STATUS_NEEDS_RESET and not g.dev.guest_errors
    finally:
        g.dev.detach()
        dma.close()


async def test_dma_unmap_reply_waits_for_requests_in_flight(nursery):
    """Issue 15 item 10: a request in flight holds views into the region: the reply
    (DmaSpaceImpl.settle, awaited by the server) comes once it completed, and the
    completion reaches the used ring when the memory is mapped again."""
    dma = MemfdDma()
    try:
        g = Guest(nursery, dma=dma)
        g.drv.init()
        await settle()
        g.target.hold = trio.Event()
        head, resp, din = g.post_cmd(READ10(0, 1), data_in=512)
        g.drv.kick(RQ)
        await settle()
        dma.unmap(0, dma.size)
        assert dma.unsettled  # the request's data views
        g.target.hold.set()
        g.target.requests.clear()
        with trio.fail_after(1):
            await dma.settle()
        assert dma.deferred_unmaps == 0 and not dma.unsettled
        assert not g.drv.used(RQ)  # its ring is not mapped: the completion waits
        dma.remap()
        g.drv.kick(RQ)
        await settle()
        assert [u[0] for u in g.drv.used(RQ)] == [head]
        assert parse_resp(dma.read(resp, RESP_LEN))["response"] == VirtioScsiResponse.OK
        assert not g.drv.status() & STATUS_NEEDS_RESET
    finally:
        g.dev.detach()
        dma.close()
