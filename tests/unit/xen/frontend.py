"""A PV-SCSI frontend for tests that behaves like Linux's xen-scsifront on the simulated platform.

It owns a simulated guest (memory, grants, an unbound event channel, a
xenstore connection as that domain), does the xenbus handshake, sends CDB
requests with direct segments or VSCSIIF_SG_GRANT indirect pages, ABORT and
RESET, follows LUN hotplug (backend Reconfiguring/Reconfigured) and closes
and reconnects. Like scsifront it ends foreign access to every grant as
soon as a response arrives and records any grant the backend still held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio

from bridge.xen import vscsiif
from bridge.xen.ring import VSCSIIF_RING_SIZE, FrontRing, init_shared_ring
from bridge.xen.vscsiif import Segment, VscsiifRequest, VscsiifResponse
from bridge.xen.xenbus import XenbusState as S
from bridge.xen.xenstore import XenStore
from tests.xen_sim.platform import SimEventChannel, SimXen

PAGE = 4096


@dataclass
class Result:
    rslt: int
    sense: bytes
    residual: int
    data: bytes = b""

    @property
    def status(self) -> int:
        return self.rslt & 0xFF

    @property
    def host(self) -> int:
        return (self.rslt >> 16) & 0xFF


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    response: VscsiifResponse | None = None
    grants: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    data_pages: list[int] = field(default_factory=list)
    length: int = 0


class SimFrontend:
    def __init__(self, sim: SimXen, xs: XenStore, domid: int, devid: int = 0,
                 backend_domid: int = 0) -> None:
        self.sim = sim
        self.xs = xs
        self.domid = domid
        self.devid = devid
        self.backend_domid = backend_domid
        self.path = f"/local/domain/{domid}/device/vscsi/{devid}"
        self.mem = sim.grant_table.memory[domid]
        self.ring: FrontRing | None = None
        self.evtchn: SimEventChannel | None = None
        self.ring_page = -1
        self.ring_ref = -1
        self.devices: set[tuple[int, int, int]] = set()
        self.sg_grant = 0
        self._pending: dict[int, _Pending] = {}
        self._free_rqids = list(range(VSCSIIF_RING_SIZE))
        self.leaked_grants: list[int] = []  # grants the backend still mapped after a response
        self.responses_seen = 0
        self.notifies_received = 0
        self.stray_responses: list[VscsiifResponse] = []
        self._ring_ready = trio.Event()
        self._slot_free = trio.Event()
        self.state_log: list[tuple[str, int]] = []

    @property
    def backend(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/vscsi/{self.domid}/{self.devid}"

    async def _be_state(self) -> int:
        return await self.xs.read_int(f"{self.backend}/state", 0) or 0

    async def _set_state(self, state: S) -> None:
        self.state_log.append(("fe", int(state)))
        await self.xs.write(f"{self.path}/state", str(int(state)))

    async def wait_backend(self, *states: S, timeout: float = 5) -> int:
        with trio.fail_after(timeout):
            async with self.xs.watch(f"{self.backend}/state") as w:
                while True:
                    st = await self._be_state()
                    if st in states:
                        return st
                    await w.wait()

    # ---- xenbus -------------------------------------------------------------
    async def connect(self, nursery: trio.Nursery) -> None:
        """scsifront_probe + scsifront_init_ring + backend_changed(Connected)."""
        await self.wait_backend(S.INIT_WAIT)
        self.sg_grant = await self.xs.read_int(f"{self.backend}/feature-sg-grant", 0) or 0
        self.ring_page = self.mem.alloc_page()
        page = self.mem.page(self.ring_page)
        page[:] = bytes(PAGE)
        init_shared_ring(page)
        self.ring = FrontRing(page)
        self.ring_ref = self.sim.grant_table.grant(self.domid, self.backend_domid, self.ring_page)
        self.evtchn = self.sim.evtchn.alloc_unbound(self.domid, self.backend_domid)

        async def body(tx: int) -> None:
            await self.xs.write(f"{self.path}/ring-ref", str(self.ring_ref), tx)
            await self.xs.write(f"{self.path}/event-channel", str(self.evtchn.port), tx)

        await self.xs.transact(body)
        await self._set_state(S.INITIALISED)
        await self.wait_backend(S.CONNECTED)
        await self._add_luns()
        await self._set_state(S.CONNECTED)
        nursery.start_soon(self._response_loop, self.ring, self.evtchn)
        nursery.start_soon(self._backend_changed_loop)

    async def _devs(self) -> list[tuple[str, int, tuple[int, int, int] | None]]:
        out = []
        for name in await self.xs.directory(f"{self.backend}/vscsi-devs", missing_ok=True):
            st = await self.xs.read_int(f"{self.backend}/vscsi-devs/{name}/state", -1)
            v = await self.xs.read_str(f"{self.backend}/vscsi-devs/{name}/v-dev", "")
            parts = (v or "").split(":")
            nexus = (int(parts[1]), int(parts[2]), int(parts[3])) if len(parts) == 4 else None
            out.append((name, st if st is not None else -1, nexus))
        return out

    async def _add_luns(self) -> None:
        """VSCSIFRONT_OP_ADD_LUN: devices whose backend state is Initialised."""
        for name, st, nexus in await self._devs():
            if st == S.INITIALISED and nexus is not None:
                self.devices.add(nexus)
                await self.xs.write(f"{self.path}/vscsi-devs/{name}/state", str(int(S.CONNECTED)))

    async def _del_luns(self) -> None:
        for name, st, nexus in await self._devs():
            if st == S.CLOSING and nexus is not None:
                self.devices.discard(nexus)
                await self.xs.write(f"{self.path}/vscsi-devs/{name}/state", str(int(S.CLOSED)))

    async def _backend_changed_loop(self) -> None:
        """scsifront_backend_changed for Reconfiguring / Reconfigured / Closing."""
        async with self.xs.watch(f"{self.backend}/state") as w:
            while True:
                await w.wait()
                st = await self._be_state()
                me = await self.xs.read_int(f"{self.path}/state", 0)
                self.state_log.append(("be", st))
                if st == S.RECONFIGURING and me == S.CONNECTED:
                    await self._del_luns()
                    await self._set_state(S.RECONFIGURING)
                elif st == S.RECONFIGURED and me == S.RECONFIGURING:
                    await self._add_luns()
                    await self._set_state(S.CONNECTED)
                elif st == S.CLOSING and me == S.CONNECTED:
                    self.devices.clear()
                    await self._set_state(S.CLOSED)
                    return

    async def close(self) -> None:
        await self._set_state(S.CLOSING)
        await self.wait_backend(S.CLOSING)
        await self._set_state(S.CLOSED)
        await self.wait_backend(S.CLOSED)
        self._teardown_ring()

    def _teardown_ring(self) -> None:
        if self.ring_ref >= 0:
            if not self.sim.grant_table.end_access(self.domid, self.ring_ref):
                self.leaked_grants.append(self.ring_ref)
            self.mem.free_page(self.ring_page)
        self.ring_ref = -1
        self.ring = None
        if self.evtchn is not None:
            self.evtchn.close()
            self.evtchn = None
        self.devices.clear()

    async def reinitialise(self, nursery: trio.Nursery) -> None:
        """What a rebooted frontend does: Initialising, wait InitWait, connect again."""
        self._teardown_ring()
        for p in list(self._pending.values()):
            p.done.set()
        self._pending.clear()
        self._free_rqids = list(range(VSCSIIF_RING_SIZE))
        await self._set_state(S.INITIALISING)
        await self.connect(nursery)

    # ---- ring ---------------------------------------------------------------
    async def _response_loop(self, ring: FrontRing, evtchn: SimEventChannel) -> None:
        while self.ring is ring:
            for raw in ring.take_responses():
                self._complete(vscsiif.decode_response(raw))
            if ring.final_check_for_responses():
                continue
            await evtchn.wait()
            self.notifies_received += 1

    def _complete(self, rsp: VscsiifResponse) -> None:
        self.responses_seen += 1
        p = self._pending.pop(rsp.rqid, None)
        if p is None:
            self.stray_responses.append(rsp)
            return
        p.response = rsp
        # scsifront_gnttab_done: end foreign access right away.
        for ref in p.grants:
            if not self.sim.grant_table.end_access(self.domid, ref):
                self.leaked_grants.append(ref)
        self._free_rqids.append(rsp.rqid)
        self._slot_free.set()
        self._slot_free = trio.Event()
        p.done.set()

    async def _rqid(self) -> int:
        while not self._free_rqids:
            await self._slot_free.wait()
        return self._free_rqids.pop(0)

    def push(self, raw: bytes) -> None:
        assert self.ring is not None and self.evtchn is not None
        self.ring.put_request(raw)
        if self.ring.push_requests_and_check_notify():
            self.evtchn.notify()

    def _grant(self, page: int, readonly: bool) -> int:
        return self.sim.grant_table.grant(self.domid, self.backend_domid, page, readonly)

    async def submit(self, cdb: bytes, nexus: tuple[int, int, int] = (0, 0, 0), *,
                     data_out: bytes = b"", data_in_len: int = 0, sg_grant: bool | None = None,
                     seg_size: int = PAGE, act: int = vscsiif.VSCSIIF_ACT_SCSI_CDB,
                     ref_rqid: int = 0, start: trio.Event | None = None) -> Result:
        """Send one request and wait for its response (the data read back for data-in)."""
        rqid = await self._rqid()
        p = _Pending()
        length = len(data_out) or data_in_len
        direction = (vscsiif.DMA_TO_DEVICE if data_out else
                     vscsiif.DMA_FROM_DEVICE if data_in_len else vscsiif.DMA_NONE)
        nsegs = math.ceil(length / seg_size) if length else 0
        segs: list[Segment] = []
        for i in range(nsegs):
            page = self.mem.alloc_page()
            p.pages.append(page)
            p.data_pages.append(page)
            n = min(seg_size, length - i * seg_size)
            view = self.mem.page(page)
            if data_out:
                view[:n] = data_out[i * seg_size:i * seg_size + n]
            else:
                view[:] = b"\xee" * PAGE  # poison: what the backend does not write shows
            ref = self._grant(page, readonly=bool(data_out))
            p.grants.append(ref)
            segs.append(Segment(ref, 0, n))
        use_sg = sg_grant if sg_grant is not None else nsegs > vscsiif.VSCSIIF_SG_TABLESIZE
        if use_sg:
            entries = []
            for chunk in range(0, len(segs), vscsiif.SG_PER_PAGE):
                part = segs[chunk:chunk + vscsiif.SG_PER_PAGE]
                page = self.mem.alloc_page()
                p.pages.append(page)
                view = self.mem.page(page)
                for j, s in enumerate(part):
                    vscsiif.SEGMENT.pack_into(view, j * 8, s.gref, s.offset, s.length)
                ref = self._grant(page, readonly=True)
                p.grants.append(ref)
                entries.append(Segment(ref, 0, len(part) * 8))
            nr = vscsiif.VSCSIIF_SG_GRANT | len(entries)
            seg_field = entries
        else:
            nr = len(segs)
            seg_field = segs
        req = VscsiifRequest(rqid, act, len(cdb), bytes(cdb), 0, nexus[0], nexus[1], nexus[2],
                             ref_rqid, direction, nr,
                             tuple(seg_field) + (Segment(0, 0, 0),) * (26 - len(seg_field)))
        p.length = length
        self._pending[rqid] = p
        self.push(vscsiif.encode_request(req))
        if start is not None:
            start.set()
        await p.done.wait()
        data = b""
        if data_in_len:
            data = b"".join(bytes(self.mem.page(pg)[:min(seg_size, length - i * seg_size)])
                            for i, pg in enumerate(p.data_pages))
        for pg in p.pages:
            self.mem.free_page(pg)
        rsp = p.response
        if rsp is None:
            raise ConnectionError("frontend reset before the response")
        return Result(rsp.rslt, rsp.sense, rsp.residual_len, data)

    async def send_raw(self, req: VscsiifRequest) -> Result:
        """Put a hand-made (possibly hostile) request on the ring and wait for its answer."""
        p = _Pending()
        self._pending[req.rqid] = p
        if req.rqid in self._free_rqids:
            self._free_rqids.remove(req.rqid)
        self.push(vscsiif.encode_request(req))
        with trio.fail_after(5):
            await p.done.wait()
        assert p.response is not None
        return Result(p.response.rslt, p.response.sense, p.response.residual_len)

    def next_rqid_hint(self) -> int:
        return self._free_rqids[0]


def raw_request(rqid: int, *, act: int = vscsiif.VSCSIIF_ACT_SCSI_CDB, cdb: bytes = b"\0" * 6,
                cmd_len: int | None = None, nexus: tuple[int, int, int] = (0, 0, 0),
                direction: int = vscsiif.DMA_NONE, nr_segments: int = 0,
                segs: list[Segment] | None = None, ref_rqid: int = 0) -> VscsiifRequest:
    segs = segs or []
    return VscsiifRequest(rqid, act, len(cdb) if cmd_len is None else cmd_len,
                          cdb.ljust(16, b"\0")[:16], 0, *nexus, ref_rqid, direction, nr_segments,
                          tuple(segs) + (Segment(0, 0, 0),) * (26 - len(segs)))

