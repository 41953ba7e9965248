"""Split virtqueue, device side (virtio 1.2 2.7).

The descriptor table, the driver area (available ring) and the device area
(used ring) are memoryviews over guest memory obtained through a DmaSpace.
Everything read from them is hostile: ``pop`` validates each chain and reports
a malformed one in ``DescriptorChain.error`` instead of raising; a fault that
leaves the queue itself unusable (an available index that jumps by more than
the queue size, a head index out of range) raises ``VirtqueueBroken`` and the
queue stays broken until the device is reset.

A chain is also malformed when it spans more guest memory, or more separate
views of it, than the device's budget allows (``max_chain_bytes``,
``max_chain_views``): the check is made before the views are built, so a
chain of many descriptors each crossing many small DMA maps costs little.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field

from bridge.barrier import full_fence
from bridge.vfio_user.device import DmaError, DmaSpace

# virtio 1.2 2.7.5 descriptor flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# virtio 1.2 2.7.6 / 2.7.8 ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 1024  # virtio 1.2 2.7: queue size is a power of 2 up to 32768; we offer 1024
# An indirect table holds at most this many descriptors. The driver is told
# seg_max (virtio-scsi config); Linux uses seg_max + 2 entries per request.
MAX_INDIRECT_DESCRIPTORS = 1024

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next (virtio 1.2 2.7.5)
# Ring indexes and event fields are read and written while the guest's vCPUs run:
# each must be one 16-bit load or store. struct cannot do that: "<H" copies byte by
# byte, and every pack_into first zeroes its bytes (memset) before writing them, so
# the guest could see used->idx go 0x0100 -> 0x0000 -> 0x0101 and take stale
# entries as completions ("request:id N is not a head!"). Item assignment on a
# memoryview cast to "H" is one aligned 2-byte memcpy, i.e. one mov (checked from
# another process in tests/unit/test_shared_index_stores.py). virtio is
# little-endian, as are the hosts we run on (asserted below).
assert sys.byteorder == "little", "virtqueue indexes are accessed in native byte order"
_USED_ELEM = struct.Struct("<II")  # id, len (virtio 1.2 2.7.8)

_OVER_BUDGET = "descriptor chain spans more guest memory or DMA maps than a request may"


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 2.7.7.2 / 2.7.10: has ``event_idx`` been passed when moving old -> new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class VirtqueueBroken(Exception):
    """The queue cannot be used any more; the device must ask for a reset (virtio 1.2 2.1.2)."""


@dataclass
class DescriptorChain:
    """One available chain: device-readable buffers, then device-writable buffers.

    When ``error`` is set the chain is malformed. ``writable`` then holds the
    device-writable buffers that could be validated; ``response_usable`` says
    whether the first of them really is the chain's first writable buffer, so
    that a FAILURE response can be written there.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    error: str | None = None
    response_usable: bool = True

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason


def queue_size_valid(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


class SplitVirtqueue:
    """The device's view of one split virtqueue."""

    def __init__(
        self,
        dma: DmaSpace,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        position: tuple[int, int] = (0, 0),
        max_chain_bytes: int = 1 << 62,
        max_chain_views: int = 1 << 62,
    ) -> None:
        if not queue_size_valid(size):
            raise VirtqueueBroken(f"queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        # virtio 1.2 2.7 table 2.4: alignment of the three areas
        if desc_addr % 16 or driver_addr % 2 or device_addr % 4:
            raise VirtqueueBroken("misaligned ring address")
        self.size = size
        self._dma = dma
        # DmaSpaceImpl.views: a buffer of physically contiguous guest pages may
        # cross the boundary between two of the client's DMA maps.
        self._views = getattr(dma, "views", None)
        self._event_idx = event_idx
        self._indirect = indirect
        self.max_chain_bytes = max_chain_bytes
        self.max_chain_views = max_chain_views
        self._areas = ((desc_addr, 16 * size), (driver_addr, 6 + 2 * size),
                       (device_addr, 6 + 8 * size))
        try:
            self._desc = dma.view(desc_addr, 16 * size, False)
            self._avail = dma.view(driver_addr, 6 + 2 * size, False)
            self._used = dma.view(device_addr, 6 + 8 * size, True)
        except DmaError as e:
            raise VirtqueueBroken(f"ring outside guest memory: {e}") from None
        # 16-bit word views: avail = flags, idx, ring[size], used_event;
        # used = flags, idx, ring[size] (4 words each), avail_event (2.7.6, 2.7.8)
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._used_event_word = 2 + size
        self._avail_event_word = 2 + 4 * size
        # virtio 1.2 2.7: both indexes start at 0 when the queue is enabled;
        # ``position`` resumes a queue whose client reconnected without a reset.
        self.last_avail_idx, self.used_idx = (p & 0xFFFF for p in position)
        self._signalled_used = self.used_idx
        self._signalled_valid = False
        self.broken: str | None = None

    # ---- driver area -------------------------------------------------
    def avail_idx(self) -> int:
        return self._avail16[1]

    def has_available(self) -> bool:
        return self.broken is None and self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated; None when the ring is empty."""
        if self.broken is not None:
            raise VirtqueueBroken(self.broken)
        avail = self.avail_idx()
        pending = (avail - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            # virtio 1.2 2.7.6: the driver can never make more than size entries available
            self._break(f"available index moved from {self.last_avail_idx} to {avail}")
        head = self._avail16[2 + self.last_avail_idx % self.size]
        if head >= self.size:
            self._break(f"head index {head} out of range")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return self._walk(head)

    def _break(self, reason: str) -> None:
        self.broken = reason
        raise VirtqueueBroken(reason)

    def _walk(self, head: int) -> DescriptorChain:
        chain = DescriptorChain(head)
        readable = chain.readable
        writable_views = chain.writable
        unpack = _DESC.unpack_from
        buffer = self._buffer
        table = self._desc
        table_len = self.size
        max_count = table_len  # virtio 1.2 2.7.5.2: no chain longer than the queue
        count = 0
        i = head
        in_indirect = False
        seen_writable = False
        left_bytes = self.max_chain_bytes
        left_views = self.max_chain_views
        failed = False
        while True:
            if count >= max_count:
                chain.fail("descriptor chain loops or is longer than its table")
                break
            count += 1
            addr, length, flags, nxt = unpack(table, 16 * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                reason = self._indirect_problem(in_indirect, length, flags)
                if reason is None:
                    try:
                        table = self._dma.view(addr, length, False)
                    except DmaError:
                        reason = "indirect table outside guest memory"
                if reason is not None:
                    chain.fail(reason)
                    break
                # virtio 1.2 2.7.5.3.2: the table's chain starts at its entry 0
                in_indirect = True
                table_len = length // 16
                max_count = table_len
                count = 0
                i = 0
                continue
            # Data buffers. Once the chain is malformed only its response buffer (the
            # first writable one) is still wanted, for a FAILURE answer.
            if flags & VIRTQ_DESC_F_WRITE:
                if length and not (failed and seen_writable):
                    if length > left_bytes or left_views <= 0:
                        chain.fail(_OVER_BUDGET)
                        break
                    left_bytes -= length
                    try:
                        views = buffer(addr, length, True, left_views)
                        left_views -= len(views)
                        writable_views.extend(views)
                    except DmaError:
                        chain.fail("writable buffer outside guest memory or read-only")
                        failed = True
                        if not seen_writable:
                            chain.response_usable = False
                seen_writable = True
            elif seen_writable:
                # virtio 1.2 2.7.4.2: readable descriptors come before writable ones
                chain.fail("device-readable descriptor after a device-writable one")
                failed = True
            elif length and not failed:
                if length > left_bytes or left_views <= 0:
                    chain.fail(_OVER_BUDGET)
                    break
                left_bytes -= length
                try:
                    views = buffer(addr, length, False, left_views)
                    left_views -= len(views)
                    readable.extend(views)
                except DmaError:
                    chain.fail("readable buffer outside guest memory")
                    failed = True
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                chain.fail(f"next index {nxt} out of range")
                break
            i = nxt
        if not seen_writable:
            chain.response_usable = False
        return chain

    def _buffer(self, addr: int, length: int, writable: bool, limit: int) -> list[memoryview]:
        """A data buffer as at most ``limit`` views; it may span adjacent DMA maps when
        the space allows."""
        if self._views is not None:
            return self._views(addr, length, writable, limit)
        return [self._dma.view(addr, length, writable)]

    def _indirect_problem(self, in_indirect: bool, length: int, flags: int) -> str | None:
        if not self._indirect:
            return "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
        if in_indirect:
            return "nested indirect descriptor"  # virtio 1.2 2.7.5.3.1
        if flags & VIRTQ_DESC_F_NEXT:
            return "indirect descriptor with NEXT set"  # virtio 1.2 2.7.5.3.1
        if length == 0 or length % 16 or length // 16 > MAX_INDIRECT_DESCRIPTORS:
            return f"indirect table length {length} invalid"
        return None

    # ---- device area -------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver: used element first, then the index (2.7.8.2)."""
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written & 0xFFFFFFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx

    def should_interrupt(self) -> bool:
        """After one or more pushes: does the driver want an interrupt? (2.7.7.2)"""
        full_fence()
        old = self._signalled_used
        new = self.used_idx
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if self._event_idx:
            used_event = self._avail16[self._used_event_word]
            return not valid or vring_need_event(used_event, new, old)
        flags = self._avail16[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Ask the driver to notify us again; True when more chains arrived meanwhile."""
        if self.broken is not None:
            return False
        if self._event_idx:
            self._used16[self._avail_event_word] = self.last_avail_idx
        else:
            self._used16[0] = 0
        full_fence()
        return self.avail_idx() != self.last_avail_idx

    def disable_notification(self) -> None:
        """While we are draining anyway, notifications are not needed (2.7.10)."""
        if not self._event_idx:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY

    @property
    def position(self) -> tuple[int, int]:
        return self.last_avail_idx, self.used_idx

    def uses(self, iova: int, size: int) -> bool:
        """Does a ring area (table, driver or device area) overlap [iova, iova+size)?"""
        return any(a < iova + size and iova < a + n for a, n in self._areas)

    def release(self) -> None:
        """Drop the ring views (device reset, client gone)."""
        for v in (self._avail16, self._used16, self._desc, self._avail, self._used):
            try:
                v.release()
            except BufferError:
                pass
