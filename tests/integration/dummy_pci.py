"""A minimal PCI device for proving the vfio-user server against QEMU's client.

Type 0 config space (PCI 3.0 section 6.1) with vendor/device id, class, one
4 KiB memory BAR0 of scratch registers, an interrupt pin (INTx), and no
capabilities. BAR sizing is QEMU's job (it emulates BARs from GET_REGION_INFO).
"""

from __future__ import annotations

import os
import struct

import trio

from bridge.vfio_user.device import (
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    DmaSpace,
    IrqInfo,
    RegionInfo,
)

VENDOR_ID = 0x1234
DEVICE_ID = 0xBEEF
CLASS_CODE = 0xFF0000  # unclassified device
BAR0_SIZE = 0x1000
RW = REGION_FLAG_READ | REGION_FLAG_WRITE


class DummyPci:
    def __init__(self) -> None:
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0x00, VENDOR_ID, DEVICE_ID)
        struct.pack_into("<I", self.config, 0x08, CLASS_CODE << 8 | 0x01)  # class, revision 1
        struct.pack_into("<I", self.config, 0x10, 0)  # BAR0: 32-bit memory, non-prefetchable
        struct.pack_into("<HH", self.config, 0x2C, VENDOR_ID, 0x0001)  # subsystem ids
        self.config[0x3D] = 1  # interrupt pin INTA#
        self.bar0 = bytearray(BAR0_SIZE)
        self.intx_fd: int | None = None
        self.events: list[tuple] = []
        self.dma: DmaSpace | None = None

    def regions(self) -> list[RegionInfo]:
        regions = [RegionInfo(0) for _ in range(9)]
        regions[0] = RegionInfo(BAR0_SIZE, RW)
        regions[7] = RegionInfo(len(self.config), RW)
        return regions

    def irqs(self) -> list[IrqInfo]:
        return [IrqInfo(1, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE), IrqInfo(0), IrqInfo(0),
                IrqInfo(0), IrqInfo(0)]

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self.events.append(("read", index, offset, count))
        space = self.bar0 if index == 0 else self.config
        return bytes(space[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.events.append(("write", index, offset, bytes(data)))
        if index == 0:
            self.bar0[offset : offset + len(data)] = data
        elif index == 7 and offset in (0x04, 0x05):  # command register only
            self.config[offset : offset + min(len(data), 0x06 - offset)] = data[: 0x06 - offset]

    def set_irq_eventfds(self, index: int, start: int, fds: list[int | None]) -> None:
        self.events.append(("irq_fds", index, start, [fd is not None for fd in fds]))
        for fd in fds:
            if self.intx_fd is not None:
                os.close(self.intx_fd)
            self.intx_fd = fd

    def set_irq_mask(self, index: int, start: int, count: int, masked: bool) -> None:
        self.events.append(("irq_mask", index, start, count, masked))

    def attach(self, nursery: trio.Nursery, dma: DmaSpace) -> None:
        self.events.append(("attach",))
        self.dma = dma

    def detach(self) -> None:
        self.events.append(("detach",))
        self.dma = None
        self.set_irq_eventfds(0, 0, [None])

    def reset(self) -> None:
        self.events.append(("reset",))
        self.bar0[:] = bytes(BAR0_SIZE)
