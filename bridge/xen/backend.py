"""One vscsi backend device (one frontend vhost of one domain), as xen-scsiback runs it.

Xenbus (xen-scsiback.c scsiback_frontend_changed, level-triggered here: each
wake-up re-reads both states and does what is still missing):
  start                     feature-sg-grant, InitWait
  frontend Initialised      map ring-ref, bind event-channel, devs 1->3, Connected
  frontend Connected        devs 3->4; after a reconfiguration, back to Connected
  frontend Reconfiguring    devs 1->3 (add) and 5->6 (remove), Reconfigured
  frontend Closing/Closed   drain and unmap, mirror the state
  frontend Initialising     (after Closed: a rebooted/reloaded frontend) InitWait again
LUN hotplug initiated here (target LunAdded/LunRemoved for this initiator):
write dev-N state 1 / state 5, then Reconfiguring, as a toolstack does.

Ring: requests are copied out of the shared page, checked, mapped and run
as their own tasks; responses are pushed with the notify-only-when-asked rule.
A broken ring disconnects this device alone (Closing, with a log line).
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from bridge.scsi.events import LunAdded, LunRemoved
from bridge.scsi.interface import ScsiTarget
from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ScsiResponse,
    ServiceResponse,
    TaskManagementFunction,
    TmfRequest,
)
from bridge.xen import translate, vscsiif
from bridge.xen.datapath import DataPath, RequestBuffers, make_datapath
from bridge.xen.devices import VDev, initiator_name, parse_pdev, vdev_for_lun
from bridge.xen.platform import EventChannel, GrantError, GrantMapping, XenPlatform
from bridge.xen.ring import BackRing, RingBroken
from bridge.xen.translate import RequestError
from bridge.xen.vscsiif import RsltHost, VscsiifRequest, VscsiifResponse
from bridge.xen.xenbus import XenbusState as S
from bridge.xen.xenstore import XenStore

log = logging.getLogger(__name__)



@dataclass
class BackendConfig:
    # Linux scsiback publishes SG_ALL (128); scsifront then uses up to 128 segments.
    sg_grant: int = 128
    grant_strategy: str = "map"  # "map" (batch map per request) or "copy" (GRANT_COPY)
    initiator: str | None = None  # overrides the name derived from the domain name


class _Connection:
    """The ring of one connected frontend and its in-flight requests."""

    def __init__(self, ring: BackRing, mapping: GrantMapping, evtchn: EventChannel) -> None:
        self.ring = ring
        self.mapping = mapping
        self.evtchn = evtchn
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.slot_freed = trio.Event()
        self.inflight: dict[int, int | None] = {}  # rqid -> tag (None for TMFs)
        self.broken: str | None = None
        self.idle_wait: trio.CancelScope | None = None  # the ring loop's wait for an event

    def kick(self) -> None:
        """Make the ring loop look at the ring again, whatever it waits for."""
        if self.idle_wait is not None:
            self.idle_wait.cancel()
        self.slot_freed.set()


# How often a connected ring is checked for a lost wake-up either way (see _watch_ring).
WATCH_INTERVAL = 10.0


class VscsiBackend:
    def __init__(self, xs: XenStore, platform: XenPlatform, target: ScsiTarget,
                 be_path: str, config: BackendConfig | None = None,
                 datapath: DataPath | None = None) -> None:
        self.xs = xs
        self.platform = platform
        self.target = target
        self.be = be_path
        self.config = config or BackendConfig()
        self.datapath = datapath or make_datapath(self.config.grant_strategy, platform.grants)
        self.devid = int(be_path.rsplit("/", 1)[1])
        self.domid = -1
        self.fe = ""
        self.initiator = InitiatorPort("")
        self.luns: dict[tuple[int, int, int], int] = {}  # (channel, id, lun) -> target LUN
        self.conn: _Connection | None = None
        self._pending: dict[int, str] = {}  # target LUN -> "add" | "remove"
        self._latched_close = False
        self._tags = itertools.count(1)
        self._watch: Any = None
        self._nursery: trio.Nursery | None = None
        self.stats = {"requests": 0, "errors": 0, "notifies": 0, "connects": 0,
                      "lost_wakeups": 0}

    # ---- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        domid = await self.xs.read_int(f"{self.be}/frontend-id")
        fe = await self.xs.read_str(f"{self.be}/frontend")
        if domid is None or not fe:
            log.error("%s: no frontend-id/frontend node, not serving", self.be)
            return
        self.domid, self.fe = domid, fe
        name = await self.xs.read_str(f"/local/domain/{domid}/name")
        self.initiator = InitiatorPort(self.config.initiator
                                       or initiator_name(name, domid, self.devid))
        log.info("%s: serving dom%d (%s) as %s", self.be, domid, name, self.initiator.name)
        self._token = trio.lowlevel.current_trio_token()
        self.target.subscribe(self._on_target_event)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with self.xs.watch(f"{self.fe}/state", f"{self.be}/state") as watch:
                    self._watch = watch
                    await self._probe()
                    while await self._step():
                        await watch.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._watch = None
            self.target.unsubscribe(self._on_target_event)
            with trio.CancelScope(shield=True):
                await self._disconnect()
            log.info("%s: backend stopped", self.be)

    def _on_target_event(self, event: object) -> None:
        if self._watch is None or not isinstance(event, LunAdded | LunRemoved):
            return
        if event.initiator != self.initiator.name:
            return
        op = "add" if isinstance(event, LunAdded) else "remove"
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # emitted from another thread: hand it to the trio loop
            self._token.run_sync_soon(self._queue_hotplug, event.lun, op)
            return
        self._queue_hotplug(event.lun, op)

    def _queue_hotplug(self, lun: int, op: str) -> None:
        self._pending[lun] = op
        if self._watch is not None:
            self._watch.poke("target-event")

    async def _switch(self, state: S) -> None:
        await self.xs.write(f"{self.be}/state", str(int(state)))

    async def _probe(self) -> None:
        be_state = await self.xs.read_int(f"{self.be}/state", 0)
        fe_state = await self.xs.read_int(f"{self.fe}/state", 0)
        if be_state == S.INIT_WAIT:
            return
        if be_state in (S.UNKNOWN, S.INITIALISING) or fe_state in (
                S.UNKNOWN, S.INITIALISING, S.INIT_WAIT, S.INITIALISED, S.CLOSED):
            await self._init_wait()
        elif fe_state == S.CONNECTED:
            # We have no ring for a frontend that believes it is connected (bridge restart).
            log.warning("%s: frontend connected to a previous backend instance; closing", self.be)
            self._latched_close = True
            await self._switch(S.CLOSING)

    async def _init_wait(self) -> None:
        await self.xs.write(f"{self.be}/feature-sg-grant", str(self.config.sg_grant))
        await self._switch(S.INIT_WAIT)

    async def _step(self) -> bool:
        """One reconciliation; False when the backend directory is gone."""
        be_state = await self.xs.read_int(f"{self.be}/state")
        if be_state is None:
            return False
        fe_state = await self.xs.read_int(f"{self.fe}/state", 0)
        log.debug("%s: step: frontend %s backend %s", self.be, fe_state, be_state)
        if self.conn is not None and self.conn.broken:
            log.error("%s: dom%d: %s; disconnecting this device", self.be, self.domid,
                      self.conn.broken)
            await self._disconnect()
            self._latched_close = True
            await self._switch(S.CLOSING)
            return True
        if await self.xs.read_int(f"{self.be}/online", 1) == 0:
            # The toolstack is detaching us (online=0, Closing): follow the frontend down.
            if fe_state in (S.CLOSING, S.CLOSED, S.UNKNOWN):
                await self._disconnect()
                if be_state != S.CLOSED and fe_state != S.CLOSING:
                    await self._switch(S.CLOSED)
                    return False
                if fe_state == S.CLOSING and be_state != S.CLOSING:
                    await self._switch(S.CLOSING)
            elif be_state not in (S.CLOSING, S.CLOSED):
                await self._switch(S.CLOSING)
            return True
        if fe_state == S.INITIALISING:
            if be_state in (S.CLOSING, S.CLOSED):
                await self._disconnect()
                self._latched_close = False
                log.info("%s: frontend re-initialising, InitWait for a reconnect", self.be)
                await self._reset_devs()
                await self._init_wait()
        elif fe_state == S.INITIALISED:
            if self.conn is None and not self._latched_close:
                if await self._connect():
                    await self._hotplug_apply()
                    await self._switch(S.CONNECTED)
                else:
                    self._latched_close = True
                    await self._switch(S.CLOSING)
        elif fe_state == S.CONNECTED:
            if self.conn is None:
                if not self._latched_close:
                    self._latched_close = True
                    await self._switch(S.CLOSING)
            elif be_state == S.RECONFIGURING:
                pass  # waiting for the frontend to take the removals
            else:
                await self._update_dev_states()
                if be_state != S.CONNECTED:
                    await self._remove_closed_devs()
                    await self._switch(S.CONNECTED)
                elif self._pending:
                    await self._start_reconfiguration()
        elif fe_state == S.RECONFIGURING:
            if be_state == S.RECONFIGURING and self.conn is not None:
                await self._hotplug_apply()
                await self._switch(S.RECONFIGURED)
        elif fe_state in (S.CLOSING, S.CLOSED):
            await self._disconnect()
            want = S.CLOSING if fe_state == S.CLOSING else S.CLOSED
            if be_state != want:
                await self._switch(want)
            if fe_state == S.CLOSED and await self.xs.read_int(f"{self.be}/online", 1) == 0:
                return False
        elif fe_state == S.UNKNOWN:
            await self._disconnect()  # frontend gone; wait for the toolstack to remove us
        return True

    # ---- connection -----------------------------------------------------------
    async def _connect(self) -> bool:
        ring_ref = await self.xs.read_int(f"{self.fe}/ring-ref")
        port = await self.xs.read_int(f"{self.fe}/event-channel")
        if ring_ref is None or port is None:
            log.error("%s: frontend Initialised without ring-ref/event-channel", self.be)
            return False
        try:
            mapping = self.platform.grants.map(self.domid, [ring_ref], True)
        except GrantError as exc:
            log.error("%s: cannot map ring-ref %d: %s", self.be, ring_ref, exc)
            return False
        try:
            evtchn = self.platform.evtchn.bind_interdomain(self.domid, port)
        except OSError as exc:
            log.error("%s: cannot bind event-channel %d: %s", self.be, port, exc)
            mapping.close()
            return False
        conn = _Connection(BackRing(mapping.pages[0]), mapping, evtchn)
        self.conn = conn
        self.stats["connects"] += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_ring, conn)
        log.info("%s: connected ring-ref %d event-channel %d (local port %d)", self.be,
                 ring_ref, port, evtchn.port)
        return True

    async def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.scope.cancel()
        await conn.done.wait()
        conn.evtchn.close()
        _close_mapping(conn.mapping, f"{self.be} ring")
        # SAM-5 6.3.4: the transport connection is gone, an I_T nexus loss.
        try:
            self.target.nexus_loss(self.initiator.name)
        except Exception:
            log.exception("%s: nexus loss", self.be)

    # ---- the ring -------------------------------------------------------------
    async def _serve_ring(self, conn: _Connection) -> None:
        try:
            with conn.scope:
                async with trio.open_nursery() as requests:
                    requests.start_soon(self._watch_ring, conn)
                    await self._ring_loop(conn, requests)
        finally:
            conn.done.set()

    async def _ring_loop(self, conn: _Connection, requests: trio.Nursery) -> None:
        ring = conn.ring
        while True:
            try:
                raws = ring.take_requests()
            except RingBroken as exc:
                conn.broken = f"broken ring: {exc}"
                requests.cancel_scope.cancel()
                if self._watch is not None:
                    self._watch.poke("broken")
                return
            for raw in raws:
                self._dispatch(conn, raw, requests)
            if raws:
                await trio.sleep(0)
                continue
            if ring.full() and ring.unconsumed():
                # Every slot holds a request still being answered: wait for a response.
                # (Not just "unconsumed": the frontend may have published since
                # take_requests read req_prod, with nothing in flight to free a slot.)
                conn.slot_freed = trio.Event()
                await conn.slot_freed.wait()
                continue
            if ring.final_check_for_requests():
                continue
            with trio.CancelScope() as conn.idle_wait:
                await conn.evtchn.wait()
            conn.idle_wait = None
            if _debug():
                log.debug("%s: event on port %d", self.be, conn.evtchn.port)

    async def _watch_ring(self, conn: _Connection) -> None:
        """Every WATCH_INTERVAL: recover (and log) a lost wake-up in either direction, and
        name requests in flight across two checks. ring.h's protocol never loses one when
        both ends follow it; this turns a lost one into a pause and a log line instead of a
        guest whose I/O hangs. A condition counts only when seen at two checks in a row
        with the indexes unchanged (the other end may simply not have run yet)."""
        previous: set[int] = set()
        seen_requests = seen_responses = None
        while True:
            await trio.sleep(WATCH_INTERVAL)
            ring = conn.ring
            idx = ring.indexes()
            # requests published and not taken, with no progress since the last check
            requests = (idx["req_prod"], idx["req_cons"], idx["rsp_prod_pvt"]) \
                if ring.unconsumed() and not ring.full() else None
            if requests is not None and requests == seen_requests:
                self.stats["lost_wakeups"] += 1
                log.warning("%s: requests published but not taken (%s, waiting for %s): "
                            "taking them", self.be, idx,
                            "an event" if conn.idle_wait is not None else "a free slot")
                conn.kick()
                requests = None
            seen_requests = requests
            responses = (idx["rsp_prod"], idx["rsp_event"]) \
                if ring.frontend_waits_for_published() else None
            if responses is not None and responses == seen_responses:
                self.stats["lost_wakeups"] += 1
                log.warning("%s: frontend waits for responses already published (%s): "
                            "notifying", self.be, idx)
                conn.evtchn.notify()
                responses = None
            seen_responses = responses
            stuck = previous & conn.inflight.keys()
            if stuck:
                log.warning("%s: rqid %s in flight for more than %.0f s (%s)", self.be,
                            sorted(stuck), WATCH_INTERVAL, idx)
            previous = set(conn.inflight)

    def _respond(self, conn: _Connection, rsp: VscsiifResponse) -> None:
        if self.conn is not conn:
            return
        conn.ring.put_response(vscsiif.encode_response(rsp))
        notify = conn.ring.push_responses_and_check_notify()
        if notify:
            conn.evtchn.notify()
            self.stats["notifies"] += 1
        if _debug():
            log.debug("%s: rqid %d answered rslt %#x residual %d notify %s", self.be, rsp.rqid,
                      rsp.rslt, rsp.residual_len, notify)
        conn.slot_freed.set()

    def _fail(self, conn: _Connection, rqid: int, host: RsltHost, why: str) -> None:
        self.stats["errors"] += 1
        log.warning("%s: dom%d rqid %d: %s", self.be, self.domid, rqid, why)
        self._respond(conn, translate.error_response(rqid, host))

    def _dispatch(self, conn: _Connection, raw: bytes, requests: trio.Nursery) -> None:
        req = vscsiif.decode_request(raw)
        self.stats["requests"] += 1
        if _debug():
            log.debug("%s: rqid %d act %d %d:%d:%d cdb %s dir %d nr_segments %#x", self.be,
                      req.rqid, req.act, req.channel, req.id, req.lun, req.cdb.hex(),
                      req.sc_data_direction, req.nr_segments)
        if req.act not in (vscsiif.VSCSIIF_ACT_SCSI_CDB, vscsiif.VSCSIIF_ACT_SCSI_ABORT,
                           vscsiif.VSCSIIF_ACT_SCSI_RESET):
            self._fail(conn, req.rqid, RsltHost.ERROR, f"unknown act {req.act}")
            return
        if req.rqid in conn.inflight:
            self._fail(conn, req.rqid, RsltHost.ERROR, "rqid already in flight")
            return
        lun = self.luns.get((req.channel, req.id, req.lun))
        if req.act != vscsiif.VSCSIIF_ACT_SCSI_CDB:
            conn.inflight[req.rqid] = None
            requests.start_soon(self._run_tmf, conn, req, lun)
            return
        if lun is None:
            self._fail(conn, req.rqid, RsltHost.NO_CONNECT,
                       f"no device {req.channel}:{req.id}:{req.lun}")
            return
        try:
            translate.check_cdb_request(req, self.config.sg_grant)
            bufs = self._acquire(req)
        except RequestError as exc:
            self._fail(conn, req.rqid, exc.host, str(exc))
            return
        except GrantError as exc:
            self._fail(conn, req.rqid, RsltHost.ERROR, f"grant: {exc}")
            return
        tag = next(self._tags)
        views = bufs.views if bufs is not None else []
        to_device = req.sc_data_direction == vscsiif.DMA_TO_DEVICE
        sreq = ScsiRequest(lun=lun, tag=tag, cdb=req.cdb, initiator=self.initiator,
                           data_out=list(views) if to_device else [],
                           data_in=[] if to_device else list(views))
        data_len = sum(map(len, views))
        # What the target answers at once (page-cache reads and writes, errors) goes out
        # now, without a task; anything else runs as a task.
        try:
            started = self.target.submit(sreq)
        except Exception:
            log.exception("%s: target failed on rqid %d", self.be, req.rqid)
            started = ScsiResponse(response=ServiceResponse.TARGET_FAILURE)
        if isinstance(started, ScsiResponse):
            self._respond(conn, self._cdb_done(req, sreq, bufs, data_len, started))
            return
        conn.inflight[req.rqid] = tag
        requests.start_soon(self._run_cdb, conn, req, sreq, bufs, data_len, started)

    def _acquire(self, req: VscsiifRequest) -> RequestBuffers | None:
        entries = req.seg[: req.seg_count]
        if not entries:
            return None
        segs: Sequence[vscsiif.Segment] = entries
        if req.sg_grant:
            segs = translate.indirect_segments(self.datapath.read_pages(self.domid, entries))
            if not segs:
                return None
        return self.datapath.acquire(self.domid, segs,
                                     req.sc_data_direction == vscsiif.DMA_FROM_DEVICE)

    async def _run_cdb(self, conn: _Connection, req: VscsiifRequest, sreq: ScsiRequest,
                       bufs: RequestBuffers | None, data_len: int,
                       pending: Awaitable[ScsiResponse]) -> None:
        try:
            result = await pending
        except Exception:
            log.exception("%s: target failed on rqid %d", self.be, req.rqid)
            result = ScsiResponse(response=ServiceResponse.TARGET_FAILURE)
        except BaseException:  # cancelled: release the guest's pages all the same
            self._cdb_done(req, sreq, bufs, data_len, None)
            raise
        conn.inflight.pop(req.rqid, None)
        self._respond(conn, self._cdb_done(req, sreq, bufs, data_len, result))

    def _cdb_done(self, req: VscsiifRequest, sreq: ScsiRequest, bufs: RequestBuffers | None,
                  data_len: int, result: ScsiResponse | None) -> VscsiifResponse:
        """Release the request's guest pages (unmap, or copy back) and build its response."""
        sreq.data_out = []
        sreq.data_in = []
        if bufs is not None:
            try:
                _finish(bufs, self.be)
            except GrantError as exc:
                log.warning("%s: rqid %d: copy back failed: %s", self.be, req.rqid, exc)
                return translate.error_response(req.rqid, RsltHost.ERROR)
        if result is None:
            return translate.error_response(req.rqid, RsltHost.ERROR)
        return translate.response_for(req.rqid, result, data_len)

    async def _run_tmf(self, conn: _Connection, req: VscsiifRequest, lun: int | None) -> None:
        ok = False
        if lun is not None:
            if req.act == vscsiif.VSCSIIF_ACT_SCSI_ABORT:
                tag = conn.inflight.get(req.ref_rqid)
                tmf = None if tag is None else TmfRequest(
                    TaskManagementFunction.ABORT_TASK, lun, tag, self.initiator)
            else:
                tmf = TmfRequest(TaskManagementFunction.LOGICAL_UNIT_RESET, lun, 0,
                                 self.initiator)
            if tmf is None:
                ok = True  # SAM-5 7.2: no such task, FUNCTION COMPLETE
            else:
                try:
                    ok = translate.tmf_succeeded((await self.target.task_management(tmf)).response)
                except trio.Cancelled:
                    raise
                except Exception:
                    log.exception("%s: task management failed", self.be)
        conn.inflight.pop(req.rqid, None)
        self._respond(conn, VscsiifResponse(
            req.rqid, vscsiif.XEN_VSCSIIF_RSLT_RESET_SUCCESS if ok
            else vscsiif.XEN_VSCSIIF_RSLT_RESET_FAILED))

    # ---- LUN hotplug ----------------------------------------------------------
    async def _devs(self) -> list[tuple[str, int | None, VDev | None, int | None]]:
        out = []
        for name in await self.xs.directory(f"{self.be}/vscsi-devs", missing_ok=True):
            base = f"{self.be}/vscsi-devs/{name}"
            state = await self.xs.read_int(f"{base}/state")
            vdev = VDev.parse(await self.xs.read_str(f"{base}/v-dev", "") or "")
            pdev = parse_pdev(await self.xs.read_str(f"{base}/p-dev", "") or "")
            out.append((name, state, vdev, pdev))
        return out

    async def _hotplug_apply(self) -> None:
        """VSCSIBACK_OP_ADD_OR_DEL_LUN: devs 1 -> 3 (or 6 if refused), 5 -> 6."""
        allowed = set(self.target.luns_for(self.initiator.name))
        for name, state, vdev, pdev in await self._devs():
            node = f"{self.be}/vscsi-devs/{name}/state"
            if state == S.INITIALISING:
                if vdev is None or pdev is None or pdev not in allowed or \
                        self.luns.get(vdev.nexus, pdev) != pdev:
                    log.warning("%s: %s refused (v-dev %s, LUN %s not mapped for %s)", self.be,
                                name, vdev, pdev, self.initiator.name)
                    await self.xs.write(node, str(int(S.CLOSED)))
                    continue
                self.luns[vdev.nexus] = pdev
                await self.xs.write(node, str(int(S.INITIALISED)))
            elif state == S.CLOSING:
                if vdev is not None:
                    self.luns.pop(vdev.nexus, None)
                await self.xs.write(node, str(int(S.CLOSED)))

    async def _reset_devs(self) -> None:
        """Before a reconnect: every live device is offered again (3/4 -> 1), as at attach."""
        self.luns.clear()
        for name, state, _, _ in await self._devs():
            if state in (S.INITIALISED, S.CONNECTED):
                await self.xs.write(f"{self.be}/vscsi-devs/{name}/state",
                                    str(int(S.INITIALISING)))

    async def _update_dev_states(self) -> None:
        """VSCSIBACK_OP_UPDATEDEV_STATE: devs 3 -> 4."""
        for name, state, vdev, _ in await self._devs():
            if state == S.INITIALISED and vdev is not None and vdev.nexus in self.luns:
                await self.xs.write(f"{self.be}/vscsi-devs/{name}/state", str(int(S.CONNECTED)))

    async def _remove_closed_devs(self) -> None:
        for name, state, _, _ in await self._devs():
            if state == S.CLOSED:
                await self.xs.rm(f"{self.be}/vscsi-devs/{name}")

    async def _start_reconfiguration(self) -> None:
        pending, self._pending = self._pending, {}
        devs = await self._devs()
        used = {int(n[4:]) for n, *_ in devs if n.startswith("dev-") and n[4:].isdigit()}
        host = next((v.host for _, _, v, _ in devs if v is not None), 0)
        changed = False

        async def body(tx: int) -> bool:
            touched = False
            next_idx = max(used, default=-1) + 1
            for lun, op in sorted(pending.items()):
                live = [(n, s) for n, s, _, p in devs if p == lun
                        and s in (S.INITIALISING, S.INITIALISED, S.CONNECTED)]
                if op == "add" and not live:
                    base = f"{self.be}/vscsi-devs/dev-{next_idx}"
                    next_idx += 1
                    await self.xs.write(f"{base}/p-dev", str(lun), tx)
                    await self.xs.write(f"{base}/p-devname", f"vscsi-bridge-lun{lun}", tx)
                    await self.xs.write(f"{base}/v-dev", str(vdev_for_lun(lun, host)), tx)
                    await self.xs.write(f"{base}/state", str(int(S.INITIALISING)), tx)
                    touched = True
                elif op == "remove":
                    for n, _ in live:
                        await self.xs.write(f"{self.be}/vscsi-devs/{n}/state",
                                            str(int(S.CLOSING)), tx)
                        touched = True
            if touched:
                await self.xs.write(f"{self.be}/state", str(int(S.RECONFIGURING)), tx)
            return touched

        changed = await self.xs.transact(body)
        if changed:
            log.info("%s: reconfiguring for %s", self.be,
                     ", ".join(f"{op} LUN {lun}" for lun, op in sorted(pending.items())))


def _debug() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def _finish(bufs: RequestBuffers, where: str) -> None:
    try:
        bufs.finish()
    except BufferError:
        gc.collect()  # a view still referenced from a cycle: collect and retry once
        try:
            bufs.finish()
        except BufferError:
            log.error("%s: guest pages still referenced after the command; left mapped", where)


def _close_mapping(mapping: GrantMapping, where: str) -> None:
    try:
        mapping.close()
    except BufferError:
        gc.collect()
        try:
            mapping.close()
        except BufferError:
            log.error("%s: mapping still referenced; left mapped", where)
