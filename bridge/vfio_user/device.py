"""What the vfio-user server needs from a device model, and what it gives it.

The server (bridge/vfio_user/server.py) owns the socket, the DMA maps and the
IRQ file descriptors it receives; a device model (bridge/virtio/pci.py) owns
config space, BARs and what happens on a register write. Region indexes are
VFIO's PCI ones: BAR0-5 = 0-5, ROM 6, CONFIG 7, VGA 8; IRQ indexes INTx 0,
MSI 1, MSI-X 2, ERR 3, REQ 4 (linux/vfio.h).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

# linux/vfio.h VFIO_REGION_INFO_FLAG_*
REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2

# linux/vfio.h VFIO_IRQ_INFO_*
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

PCI_CONFIG_REGION_INDEX = 7
PCI_MSIX_IRQ_INDEX = 2


class DmaError(Exception):
    """A guest address range that is not wholly inside one DMA mapping."""


class DmaSpace(Protocol):
    """Guest memory as the client mapped it (DMA_MAP with file descriptors)."""

    def view(self, iova: int, length: int, writable: bool) -> memoryview:
        """A memoryview over [iova, iova+length) of guest memory, no copy.

        Raises DmaError when the range is not wholly inside one mapping, or
        ``writable`` is asked of a mapping the client mapped read-only.
        """
        ...

    def on_unmap(self, callback: Callable[[int, int], None]) -> None:
        """Have ``callback(iova, size)`` called when the client unmaps a mapping, before
        the unmap is answered: the device drops its views into it there (vfio-user.rst
        DMA_UNMAP: no references to the region may remain once it is answered)."""
        ...


@dataclass
class RegionInfo:
    """One region as DEVICE_GET_REGION_INFO reports it."""

    size: int
    flags: int = 0
    # For REGION_FLAG_MMAP: the file backing the region, sent with the reply,
    # and the sparse-mmap areas (offset, size) the client may map (cap id 1).
    mmap_fd: int | None = None
    mmap_offset: int = 0
    sparse_areas: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class IrqInfo:
    """One IRQ index as DEVICE_GET_IRQ_INFO reports it."""

    count: int
    flags: int = 0


class VfioUserDevice(Protocol):
    """A PCI device model served over vfio-user.

    The server validates message framing, region indexes and offset/count
    against RegionInfo.size before calling region_read/region_write.
    """

    def regions(self) -> list[RegionInfo]: ...

    def irqs(self) -> list[IrqInfo]: ...

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def set_irq_eventfds(self, index: int, start: int, fds: list[int | None]) -> None:
        """Assign (fd) or de-assign (None) eventfds to vectors start..start+len-1.

        The device takes ownership of the fds it is given: it closes one when it
        is replaced or de-assigned, and all of them in ``detach``.
        """
        ...

    def set_irq_mask(self, index: int, start: int, count: int, masked: bool) -> None: ...

    def attach(self, nursery: trio.Nursery, dma: DmaSpace) -> None:
        """A client connected: the device may start tasks in ``nursery``
        (cancelled when the client goes) and reach guest memory through ``dma``."""
        ...

    def detach(self) -> None:
        """The client disconnected: drop DMA views and IRQ fds, keep device state."""
        ...

    def reset(self) -> None:
        """DEVICE_RESET (guest reset): back to the power-on state."""
        ...
