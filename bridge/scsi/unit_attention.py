"""Unit attention conditions, one queue per I_T_L nexus (SAM-5 5.14, SPC-4 4.5.6)."""

from __future__ import annotations

import logging
from collections import deque

from .sense import SenseData, SenseKey

log = logging.getLogger(__name__)

# (asc, ascq) of the conditions the core establishes.
POWER_ON_OCCURRED = (0x29, 0x01)
BUS_DEVICE_RESET_OCCURRED = (0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)

MAX_QUEUED = 16  # SAM-5 lets a device server drop UAs when it runs out of room


class UnitAttentions:
    """Pending UAs keyed by (initiator port name, logical unit name).

    A nexus seen for the first time gets POWER ON OCCURRED (the target just started,
    from that initiator's point of view).
    """

    def __init__(self) -> None:
        self._queues: dict[tuple[str, str], deque[tuple[int, int]]] = {}

    def _queue(self, initiator: str, lu: str) -> deque[tuple[int, int]]:
        q = self._queues.get((initiator, lu))
        if q is None:
            q = deque([POWER_ON_OCCURRED])
            self._queues[(initiator, lu)] = q
        return q

    def establish(self, initiator: str, lu: str, asc_ascq: tuple[int, int]) -> None:
        q = self._queue(initiator, lu)
        if asc_ascq in q:
            return
        # SAM-5 5.14: a reset/power-on condition (29h) supersedes the others queued.
        if asc_ascq[0] == 0x29:
            if any(a == 0x29 for a, _ in q):
                return
            q.clear()
        if len(q) >= MAX_QUEUED:
            q.pop()
        q.append(asc_ascq)
        log.debug("UA %02x/%02x established for %s on %s", *asc_ascq, initiator, lu)

    def pending(self, initiator: str, lu: str) -> tuple[int, int] | None:
        q = self._queue(initiator, lu)
        return q[0] if q else None

    def pop(self, initiator: str, lu: str) -> SenseData | None:
        """Report and clear the oldest UA (the command that reports it fails)."""
        q = self._queues.get((initiator, lu))  # on every command: no call when none pending
        if q is None:
            q = self._queue(initiator, lu)
        if not q:
            return None
        asc, ascq = q.popleft()
        return SenseData(SenseKey.UNIT_ATTENTION, asc, ascq)

    def clear(self, initiator: str, lu: str, asc_ascq: tuple[int, int]) -> None:
        q = self._queues.get((initiator, lu))
        if q is not None and asc_ascq in q:
            q.remove(asc_ascq)

    def forget_lu(self, lu: str) -> None:
        for key in [k for k in self._queues if k[1] == lu]:
            del self._queues[key]

    def snapshot(self) -> list[tuple[str, str, list[tuple[int, int]]]]:
        """(initiator, LU, pending (asc, ascq) oldest first) of every nexus with UAs queued."""
        return [(ini, lu, list(q)) for (ini, lu), q in self._queues.items() if q]
