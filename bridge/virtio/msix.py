"""MSI-X vectors backed by the eventfds the vfio-user client gives us.

QEMU emulates the MSI-X table itself (hw/vfio/pci.c); what reaches us is one
eventfd per vector (SET_IRQS index 2) and, optionally, mask/unmask. A masked
vector's interrupt is remembered in the Pending Bit Array (PCI 3.0 6.8.2.10)
and delivered on unmask.
"""

from __future__ import annotations

import logging
import os

from bridge.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class MsixVectors:
    def __init__(self, count: int) -> None:
        self.count = count
        self._fds: list[int | None] = [None] * count
        self._masked = [False] * count
        self._pending = [False] * count
        self.fired = 0  # interrupts written to eventfds (for tests and benchmarks)
        # A client can fill its eventfd's counter: one line per completion would flood.
        self._write_errors = RateLimitedLog(log, burst=5, period=10.0)

    def set_fds(self, start: int, fds: list[int | None]) -> None:
        """Assign or de-assign eventfds; takes ownership of the given fds."""
        for k, fd in enumerate(fds):
            vec = start + k
            if not 0 <= vec < self.count:
                if fd is not None:
                    os.close(fd)
                continue
            old = self._fds[vec]
            if old is not None and old != fd:
                os.close(old)
            self._fds[vec] = fd
            if fd is not None and self._pending[vec] and not self._masked[vec]:
                self._pending[vec] = False
                self._write(vec)

    def set_mask(self, start: int, count: int, masked: bool) -> None:
        for vec in range(max(0, start), min(self.count, start + count)):
            self._masked[vec] = masked
            if not masked and self._pending[vec]:
                self._pending[vec] = False
                self._write(vec)

    def fire(self, vector: int) -> None:
        if not 0 <= vector < self.count:
            return  # VIRTIO_MSI_NO_VECTOR or out of range: no interrupt
        if self._masked[vector] or self._fds[vector] is None:
            self._pending[vector] = True
            return
        self._write(vector)

    def _write(self, vector: int) -> None:
        fd = self._fds[vector]
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
            self.fired += 1
        except OSError as e:  # a closed or bogus fd from the client must not kill us
            self._write_errors.warning("MSI-X vector %d: eventfd write failed: %s", vector, e)

    def pba(self) -> bytes:
        """The Pending Bit Array, one bit per vector, in 64-bit words."""
        nbytes = (self.count + 63) // 64 * 8
        out = bytearray(nbytes)
        for vec, p in enumerate(self._pending):
            if p:
                out[vec // 8] |= 1 << (vec % 8)
        return bytes(out)

    def close_all(self) -> None:
        for vec, fd in enumerate(self._fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds[vec] = None
        self._masked = [False] * self.count

    def reset(self) -> None:
        self._pending = [False] * self.count
