"""A virtio-scsi request queue (virtio 1.2 5.6.6.1): chains taken off the ring, commands
handed to the target, responses written back, and when to look at the ring again.

Doorbell policy: while SUPPRESS_FROM or more requests are in flight, notifications
are suppressed (EVENT_IDX avail_event left behind, or VIRTQ_USED_F_NO_NOTIFY) and the
ring is re-read on every completion and by a timer (the device's busy_poll_interval);
below that they are on (virtio 1.2 2.7.10).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import trio

from bridge.scsi.buffers import gather, scatter, split, total_len
from bridge.scsi.request import ScsiRequest, ScsiResponse
from bridge.virtio.scsi_wire import (
    CMD_REQ_FIXED_SIZE,
    CMD_RESP_FIXED_SIZE,
    VirtioScsiResponse,
    decode_lun,
    encode_cmd_failure,
    encode_cmd_resp,
    encode_cmd_resp_into,
    parse_cmd_req,
)
from bridge.virtio.virtqueue import DescriptorChain, SplitVirtqueue, VirtqueueBroken

if TYPE_CHECKING:
    from bridge.virtio.scsi_device import VirtioScsiPciDevice

log = logging.getLogger(__name__)

# In-flight requests from which doorbells are suppressed. With one in flight a doorbell
# costs no more than the timer suppression needs (a deadline set and cleared per request,
# ~5 us of trio bookkeeping each time), and at queue depth 1 it saves no doorbell at all.
SUPPRESS_FROM = 2


class RequestQueue:
    """One request queue during one DRIVER_OK..reset period.

    A chain the target answers without blocking is completed in the drain
    itself; any other is served in a task of the activation's nursery.
    Subclasses (the control queue) change what a chain is (``_start``,
    ``_serve``, ``_reject``), not when the ring is looked at.
    """

    def __init__(self, device: VirtioScsiPciDevice, index: int) -> None:
        self.index = index
        self.vq: SplitVirtqueue | None = None  # opened on first use
        self.wake = trio.Event()
        self.wake.set()  # look at the ring once: work may be there already
        self.inflight = 0
        self.wait_scope: trio.CancelScope | None = None  # the worker's wait for a doorbell
        self.outstanding: set[int] = set()  # heads popped, not yet used
        self.nursery: trio.Nursery | None = None  # the activation's, once it runs
        self.closed = False
        # The client unmapped the ring's memory (DMA_UNMAP): reopen it here, and push
        # the completions that came meanwhile (head, written) then.
        self._remap_position: tuple[int, int] | None = None
        self._unpushed: list[tuple[int, int]] = []
        self._device = device
        self._pci = device.pci
        self._target = device.target
        self._initiator = device.initiator
        self._target_port = device.target_port
        self._requests = device.requests_per_queue
        self._luns: dict[bytes, int] = {}  # virtio LUN field -> decode_lun(), valid ones

    def close(self) -> tuple[int, int] | None:
        """Stop serving (tasks are cancelled by the activation) and release the ring;
        its position, if it was opened."""
        vq = self.vq
        self.vq = None
        self.nursery = None
        self.closed = True
        if vq is None:
            return self._remap_position
        vq.release()
        return vq.position

    def ring(self) -> SplitVirtqueue | None:
        vq = self.vq
        if vq is None and not self.closed:
            position = self._remap_position
            vq = self.vq = self._device.open_virtqueue(self.index, position, position is not None)
            if vq is not None:
                self._remap_position = None
        return vq

    def unmapped(self, iova: int, size: int) -> None:
        """DMA_UNMAP of [iova, iova+size): drop the ring's views if they are in it."""
        vq = self.vq
        if vq is None or not vq.uses(iova, size):
            return
        log.debug("queue %d: ring memory unmapped by the client (DMA_UNMAP %#x+%#x)",
                  self.index, iova, size)
        self.vq = None
        if vq.broken is not None:
            self.closed = True  # needs a reset anyway
        else:
            self._remap_position = vq.position
        vq.release()

    # ---- when to look at the ring -------------------------------------
    async def run(self) -> None:
        """The queue's worker: drain on wake-ups (and on the busy timer)."""
        device = self._device
        while True:
            # While SUPPRESS_FROM requests are in flight, doorbells are suppressed and the ring is
            # looked at on each completion; the deadline of this wait (set by
            # drain, no task switch needed) bounds how long a chain that arrives
            # while every request in flight is slow can wait.
            with trio.CancelScope() as scope:
                self.wait_scope = scope
                if self.inflight >= SUPPRESS_FROM and device.suppress_notify_while_busy:
                    scope.deadline = trio.current_time() + device.busy_poll_interval
                await self.wake.wait()
            self.wait_scope = None
            self.wake = trio.Event()
            self.drain()

    def drain(self, pushed: bool = False) -> None:
        """Start every available chain (up to the queue depth), then decide about doorbells.

        virtio 1.2 2.7.10: with requests in flight the driver need not notify us
        (we come back to the ring on each completion), so notifications stay
        off; they are re-enabled when the queue goes idle, and the ring is
        checked once more after that to close the race with the driver.

        Commands the target completes without blocking (page-cache reads and
        writes, errors) are answered here, without a task; the used ring is
        then signalled once for all of them (and for ``pushed``, a completion
        the caller already put there) (virtio 1.2 2.7.7.2).
        """
        vq = self.vq or self.ring()
        if vq is None or self.nursery is None:
            return
        used_before = vq.used_idx
        try:
            if self._unpushed:
                self._push_unpushed(vq)
            self._drain_ring(vq, self.nursery)
        finally:
            if (pushed or vq.used_idx != used_before) and vq.should_interrupt():
                self._pci.interrupt_queue(self.index)

    def _drain_ring(self, vq: SplitVirtqueue, nursery: trio.Nursery) -> None:
        device = self._device
        queue = self.index
        outstanding = self.outstanding
        # Bound the work done in one go (no checkpoint in between): after a ring's
        # worth of chains the worker task comes back after a scheduler pass.
        budget = vq.size
        vq.disable_notification()
        while self.inflight < vq.size:
            if budget == 0:
                self.wake.set()
                return
            budget -= 1
            try:
                chain = vq.pop()
            except VirtqueueBroken as e:
                self._pci.set_needs_reset(f"queue {queue}: {e}")
                return
            if chain is None:
                scope = self.wait_scope
                if self.inflight >= SUPPRESS_FROM and device.suppress_notify_while_busy:
                    if scope is not None and scope.deadline == math.inf:
                        scope.deadline = trio.current_time() + device.busy_poll_interval
                    return
                if vq.enable_notification():
                    vq.disable_notification()
                    continue
                if scope is not None and scope.deadline != math.inf:
                    scope.deadline = math.inf  # idle: wait for a doorbell only
                return
            head = chain.head
            if head in outstanding:
                # virtio 1.2 2.7.13: a driver must not re-post a chain it has not got back
                device._warn_guest("queue %d: head %d made available again while in flight",
                                   queue, head)
            self._requests[queue] += 1
            try:
                started = self._start(chain)
            except Exception:
                log.exception("queue %d: request failed", queue)
                started = self._reject(chain, "internal error")
            if type(started) is int:
                vq.push(head, started)
                continue
            outstanding.add(head)
            self.inflight += 1
            nursery.start_soon(self._serve, chain, started)

    def _complete(self, chain: DescriptorChain, written: int) -> None:
        vq = self.vq or self.ring()
        if vq is None:
            if self.closed:  # reset or disconnected meanwhile
                self.inflight -= 1
                self.outstanding.discard(chain.head)
            else:  # the ring is unmapped for now: in flight until it is back
                self._unpushed.append((chain.head, written))
            return
        self.inflight -= 1
        self.outstanding.discard(chain.head)
        vq.push(chain.head, written)
        # new chains may have arrived without a doorbell (suppressed while busy),
        # or we may have stopped popping at the queue depth; one interrupt decision
        # covers this completion and whatever the drain completes at once
        self.drain(pushed=True)

    def _push_unpushed(self, vq: SplitVirtqueue) -> None:
        for head, written in self._unpushed:
            self.inflight -= 1
            self.outstanding.discard(head)
            vq.push(head, written)
        self._unpushed.clear()

    # ---- what a chain is: a SCSI command ------------------------------
    async def _serve(self, chain: DescriptorChain, pending: Any) -> None:
        try:
            resp = await pending.response
            written = pending.finish(resp)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("request queue %d: command failed", self.index)
            written = self._reject(chain, "internal error")
        self._complete(chain, written)

    def _start(self, chain: DescriptorChain) -> Any:
        """Parse a request and hand it to the target: the bytes written to the chain when
        it is answered at once, else what the request's task must await and finish."""
        device = self._device
        cdb_size, sense_size = device.cdb_size, device.sense_size
        if chain.error is not None:
            return self._reject(chain, chain.error)
        hdr_len = CMD_REQ_FIXED_SIZE + cdb_size  # cmd_req_size
        resp_len = CMD_RESP_FIXED_SIZE + sense_size  # cmd_resp_size
        hdr_views, data_out = split(chain.readable, hdr_len)
        resp_views, data_in = split(chain.writable, resp_len)
        if total_len(hdr_views) < hdr_len or total_len(resp_views) < resp_len:
            return self._reject(chain, "request or response header too short")
        # The header is read once from guest memory (unpack, and the CDB copied).
        hdr = parse_cmd_req(hdr_views[0] if len(hdr_views) == 1 else gather(hdr_views, hdr_len),
                            cdb_size)
        lun = self._luns.get(hdr.lun)
        if lun is None:
            lun = decode_lun(hdr.lun)
            if lun is None:
                scatter(resp_views, encode_cmd_failure(VirtioScsiResponse.BAD_TARGET, sense_size))
                return resp_len
            if len(self._luns) >= 64:  # the guest picks the bytes: keep the cache small
                self._luns.clear()
            self._luns[hdr.lun] = lun
        # Both data-out and data-in (bidirectional; VIRTIO_SCSI_F_INOUT is not offered):
        # the core answers SERVICE_DELIVERY_FAILURE, virtio FAILURE.
        req = ScsiRequest(
            lun=lun, tag=hdr.tag, cdb=hdr.cdb, initiator=self._initiator,
            task_attr=hdr.task_attr, prio=hdr.prio, crn=hdr.crn,
            data_out=data_out, data_in=data_in, target_port=self._target_port,
        )
        data_in_len = total_len(data_in) if data_in else 0
        started = self._target.submit(req)
        if isinstance(started, ScsiResponse):
            return _finish_command(started, resp_views, resp_len, data_in_len, sense_size)
        return _PendingCommand(started, resp_views, resp_len, data_in_len, sense_size)

    def _reject(self, chain: DescriptorChain, reason: str) -> int:
        """A malformed request: FAILURE where a response fits, else NEEDS_RESET (virtio 1.2 2.1.2)."""
        self._device._warn_guest("malformed request (head %d): %s", chain.head, reason)
        if chain.response_usable and total_len(chain.writable) >= CMD_RESP_FIXED_SIZE:
            return scatter(
                chain.writable,
                encode_cmd_failure(VirtioScsiResponse.FAILURE, self._device.sense_size),
            )
        self._pci.set_needs_reset(f"request without a response buffer: {reason}")
        return 0


def _finish_command(resp: ScsiResponse, resp_views: list[memoryview], resp_len: int,
                    data_in_len: int, sense_size: int) -> int:
    """Write the virtio-scsi response; the bytes written to the chain (virtio 1.2 2.7.8)."""
    first = resp_views[0]
    if len(first) == resp_len:  # the usual framing: the response has its own buffer
        encode_cmd_resp_into(first, resp, sense_size)
    else:
        scatter(resp_views, encode_cmd_resp(resp, sense_size))
    return resp_len + max(0, data_in_len - resp.residual)


class _PendingCommand:
    """A command the target finishes in a task: what to await, and where to answer."""

    __slots__ = ("response", "resp_views", "resp_len", "data_in_len", "sense_size")

    def __init__(self, response: Awaitable[ScsiResponse], resp_views: list[memoryview],
                 resp_len: int, data_in_len: int, sense_size: int) -> None:
        self.response = response
        self.resp_views = resp_views
        self.resp_len = resp_len
        self.data_in_len = data_in_len
        self.sense_size = sense_size

    def finish(self, resp: ScsiResponse) -> int:
        return _finish_command(resp, self.resp_views, self.resp_len, self.data_in_len,
                               self.sense_size)
