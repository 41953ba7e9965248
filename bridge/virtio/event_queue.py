"""The virtio-scsi event queue (virtio 1.2 5.6.6.3): the target's hot-plug and
capacity events as virtio-scsi events, and the events that found no buffer."""

from __future__ import annotations

import logging
from collections.abc import Callable

from bridge.scsi.buffers import scatter, total_len
from bridge.scsi.events import CapacityChanged, LunAdded, LunRemoved, TargetEvent
from bridge.virtio.pci import VirtioPciTransport
from bridge.virtio.scsi_wire import (
    EVENT_SIZE,
    VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_NO_EVENT,
    VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
    encode_event,
    event_lun,
)
from bridge.virtio.virtqueue import SplitVirtqueue, VirtqueueBroken

log = logging.getLogger(__name__)

EVENTQ = 1

# SBC-3: CAPACITY DATA HAS CHANGED, reported as PARAM_CHANGE reason asc | ascq << 8
_PARAM_CHANGE_CAPACITY = 0x2A | 0x09 << 8

# (position to resume or None, whether the ring's memory is being remapped) -> ring
RingOpener = Callable[[tuple[int, int] | None, bool], SplitVirtqueue | None]


class EventQueue:
    """Queue 1, for the device's lifetime; its ring exists only while the driver is up."""

    def __init__(self, pci: VirtioPciTransport, initiator: str,
                 warn: Callable[..., None]) -> None:
        self.missed = False  # an event was dropped: flag it in the next one
        self.vq: SplitVirtqueue | None = None
        self._pci = pci
        self._initiator = initiator
        self._warn = warn
        self._open: RingOpener | None = None
        self._remap_position: tuple[int, int] | None = None  # see unmapped

    def start(self, open_ring: RingOpener) -> None:
        """DRIVER_OK: events go to the ring ``open_ring`` gives (on first use); it is
        called with a position to resume and whether the ring is being remapped."""
        self._open = open_ring
        self._remap_position = None

    def stop(self) -> tuple[int, int] | None:
        """Reset or disconnect: no driver to tell. Releases the ring; its position, if
        it was opened."""
        vq = self.vq
        self.vq = None
        self._open = None
        if vq is None:
            return self._remap_position
        vq.release()
        return vq.position

    def unmapped(self, iova: int, size: int) -> None:
        """DMA_UNMAP of [iova, iova+size): drop the ring's views if they are in it; it is
        opened again at its position when the next event comes."""
        vq = self.vq
        if vq is None or not vq.uses(iova, size):
            return
        log.debug("event queue: ring memory unmapped by the client (DMA_UNMAP %#x+%#x)",
                  iova, size)
        self.vq = None
        if vq.broken is None:
            self._remap_position = vq.position
        else:
            self._open = None  # needs a reset anyway
        vq.release()

    def on_target_event(self, event: TargetEvent) -> None:
        try:
            if event.initiator != self._initiator:
                return
            if isinstance(event, LunAdded | LunRemoved):
                if not self._pci.negotiated(VIRTIO_SCSI_F_HOTPLUG):
                    return  # the guest learns from REPORTED LUNS DATA HAS CHANGED instead
                reason = (
                    VIRTIO_SCSI_EVT_RESET_RESCAN if isinstance(event, LunAdded)
                    else VIRTIO_SCSI_EVT_RESET_REMOVED
                )
                self._push(VIRTIO_SCSI_T_TRANSPORT_RESET, event_lun(event.lun), reason)
            elif isinstance(event, CapacityChanged):
                if not self._pci.negotiated(VIRTIO_SCSI_F_CHANGE):
                    return
                self._push(
                    VIRTIO_SCSI_T_PARAM_CHANGE, event_lun(event.lun), _PARAM_CHANGE_CAPACITY
                )
        except Exception:
            log.exception("delivering target event %r", event)

    def flush_missed(self) -> None:
        """The driver posted event buffers: report events we had to drop (5.6.6.3)."""
        if self.missed:
            self._push(VIRTIO_SCSI_T_NO_EVENT, bytes(8), 0)

    def _push(self, event: int, lun: bytes, reason: int) -> None:
        if self._open is None:
            return  # no driver: it scans the bus when it comes up
        vq = self.vq
        if vq is None:
            position = self._remap_position
            vq = self.vq = self._open(position, position is not None)
            if vq is None:
                self.missed = True
                return
            self._remap_position = None
        used_before = vq.used_idx
        try:
            self._deliver(vq, event, lun, reason)
        finally:
            if vq.used_idx != used_before and vq.should_interrupt():
                self._pci.interrupt_queue(EVENTQ)

    def _deliver(self, vq: SplitVirtqueue, event: int, lun: bytes, reason: int) -> None:
        # At most a ring's worth of chains per event: a guest that re-posts malformed
        # buffers as fast as they come back would otherwise keep the loop going.
        # Past that the event is dropped and flagged missed (5.6.6.3.1): the driver
        # learns with the next event, or with the NO_EVENT sent on its next kick.
        for _ in range(vq.size):
            try:
                chain = vq.pop()
            except VirtqueueBroken as e:
                self._pci.set_needs_reset(f"event queue: {e}")
                self.missed = True
                return
            if chain is None:
                # virtio 1.2 5.6.6.3.1: no buffer: flag the loss in the next event
                self.missed = True
                return
            if chain.error is not None or total_len(chain.writable) < EVENT_SIZE:
                # returned empty; the driver sees it with the next interrupt
                self._warn("malformed event buffer (head %d): %s", chain.head, chain.error)
                vq.push(chain.head, 0)
                continue
            if self.missed:
                event |= VIRTIO_SCSI_T_EVENTS_MISSED
                self.missed = False
            vq.push(chain.head, scatter(chain.writable, encode_event(event, lun, reason)))
            return
        self._warn("event queue: %d malformed event buffers in a row, event dropped", vq.size)
        self.missed = True
