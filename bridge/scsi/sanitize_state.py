"""Where a logical unit is in a sanitize operation (SBC-3 4.11), as dispatch sees it.

While a sanitize operation runs, commands that access the medium get NOT READY,
LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (04h/1Bh) with its progress, and
REQUEST SENSE reports the same. After one failed, the LU is in sanitize failure
mode: medium access gets MEDIUM ERROR, SANITIZE COMMAND FAILED (31h/03h), until a
sanitize operation succeeds or (AUSE was one) EXIT FAILURE MODE.
"""

from __future__ import annotations

from .sense import ProgressIndication, SenseData, SenseKey


class SanitizeState:
    __slots__ = ("running", "done", "total", "failed", "ause")

    def __init__(self) -> None:
        self.running = False
        self.done = 0  # progress: units of work done of ``total``
        self.total = 1
        self.failed = False
        self.ause = False  # the failed operation allowed EXIT FAILURE MODE

    def progress_sense(self) -> SenseData:
        fraction = (self.done * 0x10000) // max(self.total, 1)
        return SenseData(SenseKey.NOT_READY, 0x04, 0x1B, ProgressIndication(fraction))

    def blocking_sense(self) -> SenseData | None:
        """The sense a medium-access command gets now, or None when it may run."""
        if self.running:
            return self.progress_sense()
        if self.failed:
            return SenseData(SenseKey.MEDIUM_ERROR, 0x31, 0x03)
        return None
