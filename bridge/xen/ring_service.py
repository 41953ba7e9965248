"""The shared ring of one connected vscsiif frontend: requests in, responses out.

Requests are copied out of the shared page (ring.h), checked and translated
(translate.py), their grants mapped or copied (datapath.py), and submitted to
the target core; what the core answers at once goes back at once, the rest runs
as its own task. ABORT and RESET become SAM-5 task management functions.
Responses are pushed with the notify-only-when-asked rule (RING_PUSH_RESPONSES_
AND_CHECK_NOTIFY). A watch every WATCH_INTERVAL recovers a lost wake-up either
way. A broken ring ends the service and tells the backend (``on_broken``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

import trio

from bridge.ratelimit import RateLimitedLog
from bridge.scsi.interface import ScsiTarget
from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ScsiResponse,
    ServiceResponse,
    TargetPort,
    TaskManagementFunction,
    TmfRequest,
)
from bridge.xen import translate, vscsiif
from bridge.xen.datapath import DataPath, RequestBuffers
from bridge.xen.platform import EventChannel, GrantError, GrantMapping
from bridge.xen.ring import BackRing, RingBroken
from bridge.xen.translate import RequestError
from bridge.xen.vscsiif import RsltHost, VscsiifRequest, VscsiifResponse

log = logging.getLogger(__name__)

# How often a connected ring is checked for a lost wake-up either way (see _watch_ring).
WATCH_INTERVAL = 10.0


class RingService:
    """The ring of one connected frontend and its in-flight requests."""

    def __init__(self, ring: BackRing, mapping: GrantMapping, evtchn: EventChannel, *,
                 target: ScsiTarget, datapath: DataPath, initiator: InitiatorPort, domid: int,
                 luns: dict[tuple[int, int, int], int], sg_grant: int, tags: Iterator[int],
                 stats: dict[str, int], name: str, on_broken: Callable[[], None],
                 guest_log: RateLimitedLog, target_port: TargetPort | None = None) -> None:
        self.ring = ring
        self.mapping = mapping
        self.evtchn = evtchn
        self.target = target
        self.datapath = datapath
        self.initiator = initiator
        # This vscsi device is one target port (scsi/ports.py: its relative id, when the
        # backend was given one); the Block Limits page tells the guest what this port
        # carries (SBC-3 6.6.4).
        self.target_port = dataclasses.replace(
            target_port or TargetPort(name),
            max_transfer_bytes=translate.max_transfer_bytes(sg_grant))
        self.domid = domid
        self.luns = luns  # (channel, id, lun) -> target LUN; the backend's, kept current
        self.sg_grant = sg_grant
        self.stats = stats
        self.name = name
        self._tags = tags
        self._on_broken = on_broken
        self.guest_log = guest_log  # what the frontend causes is logged through this
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.slot_freed = trio.Event()
        self.inflight: dict[int, int | None] = {}  # rqid -> tag (None for TMFs)
        self.broken: str | None = None
        self.closed = False  # no more responses: the backend let go of this ring
        self.idle_wait: trio.CancelScope | None = None  # the ring loop's wait for an event
        # During a pass over the ring: CDB requests the target answered at once, to be
        # finished (guest pages released, data copied back) and answered after the pass.
        self._answered: list[tuple[VscsiifRequest, ScsiRequest, RequestBuffers, int,
                                   ScsiResponse]] | None = None

    def kick(self) -> None:
        """Make the ring loop look at the ring again, whatever it waits for."""
        if self.idle_wait is not None:
            self.idle_wait.cancel()
        self.slot_freed.set()

    async def serve(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as requests:
                    requests.start_soon(self._watch_ring)
                    await self._ring_loop(requests)
        finally:
            self.done.set()

    async def close(self) -> None:
        """Stop serving (in-flight requests cancelled), unbind and unmap the ring."""
        self.closed = True
        self.scope.cancel()
        await self.done.wait()
        self.evtchn.close()
        _release(self.mapping.close, f"{self.name}: ring mapping")

    async def _ring_loop(self, requests: trio.Nursery) -> None:
        ring = self.ring
        while True:
            try:
                raws = ring.take_requests()
            except RingBroken as exc:
                self.broken = f"broken ring: {exc}"
                requests.cancel_scope.cancel()
                self._on_broken()
                return
            # Requests answered at once are finished together after the pass (one grant
            # copy for all their data-in with the copy strategy).
            self._answered = []
            try:
                for raw in raws:
                    self._dispatch(raw, requests)
            finally:
                self._finish_answered()
            if raws:
                await trio.sleep(0)
                continue
            if ring.full() and ring.unconsumed():
                # Every slot holds a request still being answered: wait for a response.
                # (Not just "unconsumed": the frontend may have published since
                # take_requests read req_prod, with nothing in flight to free a slot.)
                self.slot_freed = trio.Event()
                await self.slot_freed.wait()
                continue
            if ring.final_check_for_requests():
                continue
            with trio.CancelScope() as self.idle_wait:
                await self.evtchn.wait()
            self.idle_wait = None
            if _debug():
                log.debug("%s: event on port %d", self.name, self.evtchn.port)

    async def _watch_ring(self) -> None:
        """Every WATCH_INTERVAL: recover (and log) a lost wake-up in either direction, and
        name requests in flight across two checks. ring.h's protocol never loses one when
        both ends follow it; this turns a lost one into a pause and a log line instead of a
        guest whose I/O hangs. A condition counts only when seen at two checks in a row
        with the indexes unchanged (the other end may simply not have run yet)."""
        previous: set[int] = set()
        seen_requests = seen_responses = None
        while True:
            await trio.sleep(WATCH_INTERVAL)
            ring = self.ring
            idx = ring.indexes()
            # requests published and not taken, with no progress since the last check
            requests = (idx["req_prod"], idx["req_cons"], idx["rsp_prod_pvt"]) \
                if ring.unconsumed() and not ring.full() else None
            if requests is not None and requests == seen_requests:
                self.stats["lost_wakeups"] += 1
                log.warning("%s: requests published but not taken (%s, waiting for %s): "
                            "taking them", self.name, idx,
                            "an event" if self.idle_wait is not None else "a free slot")
                self.kick()
                requests = None
            seen_requests = requests
            responses = (idx["rsp_prod"], idx["rsp_event"]) \
                if ring.frontend_waits_for_published() else None
            if responses is not None and responses == seen_responses:
                self.stats["lost_wakeups"] += 1
                log.warning("%s: frontend waits for responses already published (%s): "
                            "notifying", self.name, idx)
                self.evtchn.notify()
                responses = None
            seen_responses = responses
            stuck = previous & self.inflight.keys()
            if stuck:
                log.warning("%s: rqid %s in flight for more than %.0f s (%s)", self.name,
                            sorted(stuck), WATCH_INTERVAL, idx)
            previous = set(self.inflight)

    def _respond(self, rsp: VscsiifResponse) -> None:
        if self.closed:
            return
        self.ring.put_response(vscsiif.encode_response(rsp))
        notify = self.ring.push_responses_and_check_notify()
        if notify:
            self.evtchn.notify()
            self.stats["notifies"] += 1
        if _debug():
            log.debug("%s: rqid %d answered rslt %#x residual %d notify %s", self.name, rsp.rqid,
                      rsp.rslt, rsp.residual_len, notify)
        self.slot_freed.set()

    def _fail(self, rqid: int, host: RsltHost, why: str) -> None:
        self.stats["errors"] += 1
        self.guest_log.warning("%s: dom%d rqid %d: %s", self.name, self.domid, rqid, why)
        self._respond(translate.error_response(rqid, host))

    def _dispatch(self, raw: bytes, requests: trio.Nursery) -> None:
        req = vscsiif.decode_request(raw)
        self.stats["requests"] += 1
        if _debug():
            log.debug("%s: rqid %d act %d %d:%d:%d cdb %s dir %d nr_segments %#x", self.name,
                      req.rqid, req.act, req.channel, req.id, req.lun, req.cdb.hex(),
                      req.sc_data_direction, req.nr_segments)
        if req.act not in (vscsiif.VSCSIIF_ACT_SCSI_CDB, vscsiif.VSCSIIF_ACT_SCSI_ABORT,
                           vscsiif.VSCSIIF_ACT_SCSI_RESET):
            self._fail(req.rqid, RsltHost.ERROR, f"unknown act {req.act}")
            return
        if req.rqid in self.inflight:
            self._fail(req.rqid, RsltHost.ERROR, "rqid already in flight")
            return
        lun = self.luns.get((req.channel, req.id, req.lun))
        if req.act != vscsiif.VSCSIIF_ACT_SCSI_CDB:
            self.inflight[req.rqid] = None
            requests.start_soon(self._run_tmf, req, lun)
            return
        if lun is None:
            self._fail(req.rqid, RsltHost.NO_CONNECT,
                       f"no device {req.channel}:{req.id}:{req.lun}")
            return
        try:
            translate.check_cdb_request(req, self.sg_grant)
            bufs = self._acquire(req)
        except RequestError as exc:
            self._fail(req.rqid, exc.host, str(exc))
            return
        except GrantError as exc:
            self._fail(req.rqid, RsltHost.ERROR, f"grant: {exc}")
            return
        tag = next(self._tags)
        views = bufs.views if bufs is not None else []
        to_device = req.sc_data_direction == vscsiif.DMA_TO_DEVICE
        sreq = ScsiRequest(lun=lun, tag=tag, cdb=req.cdb, initiator=self.initiator,
                           data_out=list(views) if to_device else [],
                           data_in=[] if to_device else list(views), target_port=self.target_port)
        data_len = sum(map(len, views))
        # What the target answers at once (page-cache reads and writes, errors) goes out
        # now, without a task; anything else runs as a task.
        try:
            started = self.target.submit(sreq)
        except Exception:
            log.exception("%s: target failed on rqid %d", self.name, req.rqid)
            started = ScsiResponse(response=ServiceResponse.TARGET_FAILURE)
        if isinstance(started, ScsiResponse):
            if bufs is not None and self._answered is not None:
                self._answered.append((req, sreq, bufs, data_len, started))
            else:
                self._respond(self._cdb_done(req, sreq, bufs, data_len, started))
            return
        self.inflight[req.rqid] = tag
        requests.start_soon(self._run_cdb, req, sreq, bufs, data_len, started)

    def _finish_answered(self) -> None:
        answered, self._answered = self._answered, None
        if not answered:
            return
        try:
            self.datapath.copy_out_together([a[2] for a in answered])
        except Exception as exc:  # each finish copies its own: only a bad one fails
            log.debug("%s: copy-out of %d requests together failed (%s): one by one",
                      self.name, len(answered), exc)
        for req, sreq, bufs, data_len, result in answered:
            self._respond(self._cdb_done(req, sreq, bufs, data_len, result))

    def _acquire(self, req: VscsiifRequest) -> RequestBuffers | None:
        entries = req.seg[: req.seg_count]
        if not entries or req.sc_data_direction == vscsiif.DMA_NONE:
            return None  # no data: segments (stale ones from xen-scsifront's EH) are ignored
        segs: Sequence[vscsiif.Segment] = entries
        if req.sg_grant:
            segs = translate.indirect_segments(self.datapath.read_pages(self.domid, entries))
            if not segs:
                return None
        return self.datapath.acquire(self.domid, segs,
                                     req.sc_data_direction == vscsiif.DMA_FROM_DEVICE)

    async def _run_cdb(self, req: VscsiifRequest, sreq: ScsiRequest,
                       bufs: RequestBuffers | None, data_len: int,
                       pending: Awaitable[ScsiResponse]) -> None:
        try:
            result = await pending
        except Exception:
            log.exception("%s: target failed on rqid %d", self.name, req.rqid)
            result = ScsiResponse(response=ServiceResponse.TARGET_FAILURE)
        except BaseException:  # cancelled: release the guest's pages all the same
            self._cdb_done(req, sreq, bufs, data_len, None)
            raise
        self.inflight.pop(req.rqid, None)
        self._respond(self._cdb_done(req, sreq, bufs, data_len, result))

    def _cdb_done(self, req: VscsiifRequest, sreq: ScsiRequest, bufs: RequestBuffers | None,
                  data_len: int, result: ScsiResponse | None) -> VscsiifResponse:
        """Release the request's guest pages (unmap, or copy back) and build its response."""
        sreq.data_out = []
        sreq.data_in = []
        if bufs is not None:
            try:
                _release(bufs.finish, f"{self.name}: rqid {req.rqid} guest pages")
            except GrantError as exc:  # a guest error as much as a grant refused up front
                self.stats["errors"] += 1
                self.guest_log.warning("%s: rqid %d: copy back failed: %s", self.name, req.rqid,
                                       exc)
                return translate.error_response(req.rqid, RsltHost.ERROR)
        if result is None:
            return translate.error_response(req.rqid, RsltHost.ERROR)
        return translate.response_for(req.rqid, result, data_len)

    async def _run_tmf(self, req: VscsiifRequest, lun: int | None) -> None:
        ok = False
        if lun is not None:
            if req.act == vscsiif.VSCSIIF_ACT_SCSI_ABORT:
                tag = self.inflight.get(req.ref_rqid)
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
                    log.exception("%s: task management failed", self.name)
        self.inflight.pop(req.rqid, None)
        self._respond(VscsiifResponse(
            req.rqid, vscsiif.XEN_VSCSIIF_RSLT_RESET_SUCCESS if ok
            else vscsiif.XEN_VSCSIIF_RSLT_RESET_FAILED))


def _debug() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def _release(release: Callable[[], None], what: str) -> None:
    """Unmap (or copy back and free) guest pages; a memoryview still referenced from a
    cycle makes mmap.close raise BufferError: collect, retry once, else leave it mapped."""
    try:
        release()
    except BufferError:
        gc.collect()
        try:
            release()
        except BufferError:
            log.error("%s still referenced; left mapped", what)
