"""Xen shared ring for vscsiif (xen/include/public/io/ring.h), both ends.

The shared page starts with ``struct vscsiif_sring``: req_prod, req_event,
rsp_prod, rsp_event (RING_IDX = uint32) and padding to 64 bytes, then the
ring of 252-byte request/response slots. Indexes are free-running uint32s;
the slot is index & (size - 1).

Ordering: on x86 (TSO) stores are not reordered with stores nor loads with
loads; the store->load cases (the final-check and push-and-check rules) get
ring.h's xen_mb() from bridge/barrier.py. The indexes are 4-byte aligned and
read and written with one access each (see _Sring).
"""

from __future__ import annotations

import struct
import sys

from bridge.barrier import full_fence
from bridge.xen.vscsiif import REQUEST_SIZE, RESPONSE_SIZE, VSCSIIF_PAGE_SIZE

SRING_HEADER = struct.Struct("<IIII")
SRING_HEADER_SIZE = 64  # four indexes + __pad[48]
SRING_OFFSETS = {"req_prod": 0, "req_event": 4, "rsp_prod": 8, "rsp_event": 12, "ring": 64}
_U32 = 0xFFFFFFFF
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12


def ring_size(page_size: int = VSCSIIF_PAGE_SIZE, entry_size: int = REQUEST_SIZE) -> int:
    """__CONST_RING_SIZE: (page - header) / entry, rounded down to a power of two."""
    n = (page_size - SRING_HEADER_SIZE) // entry_size
    return 1 << (n.bit_length() - 1) if n else 0


VSCSIIF_RING_SIZE = ring_size()  # 16
assert RESPONSE_SIZE == REQUEST_SIZE


class RingBroken(Exception):
    """The other end published indexes that cannot be right (more than a ring ahead)."""


assert sys.byteorder == "little", "ring indexes are accessed in native byte order"


class _Sring:
    def __init__(self, page: memoryview, size: int = VSCSIIF_RING_SIZE) -> None:
        if len(page) < SRING_HEADER_SIZE + size * REQUEST_SIZE:
            raise ValueError("shared ring page too small")
        self.page = page
        self.size = size

    # The producer/consumer indexes are shared with the other domain while it runs:
    # one 32-bit load or store each. struct cannot store one: "<I" copies byte by
    # byte and every pack_into zeroes its bytes first (a frontend could read
    # rsp_prod == 0, or req_event == 0 and skip a notification). Item access on a
    # memoryview cast to "I" is one aligned 4-byte memcpy, one mov on the
    # little-endian hosts Xen's x86 and Arm ABIs have. The cast view is made per
    # access so that nothing outlives the grant mapping (gntdev unmap needs every
    # view of the page released).
    def _get(self, off: int) -> int:
        return self.page[off:off + 4].cast("I")[0]

    def _set(self, off: int, value: int) -> None:
        self.page[off:off + 4].cast("I")[0] = value & _U32

    def _slot(self, idx: int) -> int:
        return SRING_HEADER_SIZE + (idx & (self.size - 1)) * REQUEST_SIZE


def init_shared_ring(page: memoryview) -> None:
    """SHARED_RING_INIT: producers at 0, events at 1 (done by the frontend)."""
    SRING_HEADER.pack_into(page, 0, 0, 1, 0, 1)
    page[16:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE - 16)


class BackRing(_Sring):
    """The backend's view: consumes requests, produces responses (BACK_RING_INIT)."""

    def __init__(self, page: memoryview, size: int = VSCSIIF_RING_SIZE) -> None:
        super().__init__(page, size)
        self.req_cons = 0
        self.rsp_prod_pvt = 0

    def take_requests(self, limit: int | None = None) -> list[bytes]:
        """Copy out the requests published so far (RING_COPY_REQUEST: no double fetch).

        Raises RingBroken when req_prod runs more than a ring ahead of the
        responses (RING_REQUEST_PROD_OVERFLOW). Stops when consuming more
        would leave no response slot (RING_REQUEST_CONS_OVERFLOW).
        """
        rp = self._get(_REQ_PROD)
        if ((rp - self.rsp_prod_pvt) & _U32) > self.size:
            raise RingBroken(
                f"req_prod {rp} is more than {self.size} ahead of rsp_prod {self.rsp_prod_pvt}")
        out: list[bytes] = []
        while self.req_cons != rp:
            if ((self.req_cons - self.rsp_prod_pvt) & _U32) >= self.size:
                break
            if limit is not None and len(out) >= limit:
                break
            off = self._slot(self.req_cons)
            out.append(bytes(self.page[off:off + REQUEST_SIZE]))
            self.req_cons = (self.req_cons + 1) & _U32
        return out

    def unconsumed(self) -> int:
        return (self._get(_REQ_PROD) - self.req_cons) & _U32

    def full(self) -> bool:
        """Every slot holds a request not answered yet (RING_REQUEST_CONS_OVERFLOW)."""
        return ((self.req_cons - self.rsp_prod_pvt) & _U32) >= self.size

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: arm req_event, then look again."""
        if self.unconsumed():
            return True
        self._set(_REQ_EVENT, self.req_cons + 1)
        full_fence()  # ring.h RING_FINAL_CHECK_FOR_REQUESTS: xen_mb() before looking again
        return bool(self.unconsumed())

    def put_response(self, data: bytes) -> None:
        if len(data) != RESPONSE_SIZE:
            raise ValueError("response must be one slot")
        if self.rsp_prod_pvt == self.req_cons:
            raise RuntimeError("response without an outstanding request")
        off = self._slot(self.rsp_prod_pvt)
        self.page[off:off + RESPONSE_SIZE] = data
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _U32

    def indexes(self) -> dict[str, int]:
        """The shared and private indexes, for logs."""
        return {"req_prod": self._get(_REQ_PROD), "req_event": self._get(_REQ_EVENT),
                "rsp_prod": self._get(_RSP_PROD), "rsp_event": self._get(_RSP_EVENT),
                "req_cons": self.req_cons, "rsp_prod_pvt": self.rsp_prod_pvt}

    def frontend_waits_for_published(self) -> bool:
        """rsp_event lies at or below rsp_prod: the frontend asked to be woken for a
        response that is already there (a notification it should have had)."""
        prod = self._get(_RSP_PROD)
        return ((prod - self._get(_RSP_EVENT)) & _U32) < self.size

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: notify only if rsp_event lies in (old, new]."""
        old = self._get(_RSP_PROD)
        new = self.rsp_prod_pvt
        self._set(_RSP_PROD, new)
        full_fence()  # ring.h RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: xen_mb() before rsp_event
        return ((new - self._get(_RSP_EVENT)) & _U32) < ((new - old) & _U32)


class FrontRing(_Sring):
    """The frontend's view (used by test frontends and tools)."""

    def __init__(self, page: memoryview, size: int = VSCSIIF_RING_SIZE) -> None:
        super().__init__(page, size)
        self.req_prod_pvt = 0
        self.rsp_cons = 0

    def free_slots(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _U32)

    def put_request(self, data: bytes) -> None:
        if self.free_slots() <= 0:
            raise RuntimeError("ring full")
        off = self._slot(self.req_prod_pvt)
        self.page[off:off + REQUEST_SIZE] = data
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _U32

    def push_requests_and_check_notify(self) -> bool:
        old = self._get(_REQ_PROD)
        new = self.req_prod_pvt
        self._set(_REQ_PROD, new)
        full_fence()
        return ((new - self._get(_REQ_EVENT)) & _U32) < ((new - old) & _U32)

    def take_responses(self) -> list[bytes]:
        rp = self._get(_RSP_PROD)
        out = []
        while self.rsp_cons != rp:
            off = self._slot(self.rsp_cons)
            out.append(bytes(self.page[off:off + RESPONSE_SIZE]))
            self.rsp_cons = (self.rsp_cons + 1) & _U32
        return out

    def final_check_for_responses(self) -> bool:
        if (self._get(_RSP_PROD) - self.rsp_cons) & _U32:
            return True
        self._set(_RSP_EVENT, self.rsp_cons + 1)
        full_fence()
        return bool((self._get(_RSP_PROD) - self.rsp_cons) & _U32)
