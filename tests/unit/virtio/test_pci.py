"""virtio modern PCI transport: config space, capabilities, common config, ISR, MSI-X."""

from __future__ import annotations

import os
import struct

from bridge.scsi.request import InitiatorPort
from bridge.vfio_user.device import IRQ_INFO_EVENTFD, PCI_CONFIG_REGION_INDEX
from bridge.virtio.pci import (
    ISR_OFFSET,
    MSIX_PBA_BAR,
    STATUS_FEATURES_OK,
    VIRTIO_BAR,
    VIRTIO_MSI_NO_VECTOR,
)
from bridge.virtio.scsi_device import VirtioScsiPciDevice
from bridge.virtio.virtqueue import vring_need_event

from .fakes import Driver, FakeDma, FakeTarget, settle

CFG = PCI_CONFIG_REGION_INDEX


def make(**kw) -> tuple[VirtioScsiPciDevice, Driver]:
    dev = VirtioScsiPciDevice(FakeTarget(), InitiatorPort("iqn.x:y"), **kw)
    return dev, Driver(dev, FakeDma())


def cfg(dev, off: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, off, size), "little")


def caps(dev) -> dict[int, tuple[int, ...]]:
    """Walk the capability list like Linux's pci_find_capability / virtio_pci_find_capability."""
    out = {}
    pos = cfg(dev, 0x34, 1)
    seen = 0
    while pos and seen < 48:
        cap_id = cfg(dev, pos, 1)
        if cap_id == 0x09:
            cfg_type, bar = cfg(dev, pos + 3, 1), cfg(dev, pos + 4, 1)
            offset, length = cfg(dev, pos + 8, 4), cfg(dev, pos + 12, 4)
            extra = cfg(dev, pos + 16, 4) if cfg(dev, pos + 2, 1) >= 20 else None
            out[cfg_type] = (pos, bar, offset, length, extra)
        else:
            out[0x100 + cap_id] = (pos,)
        pos = cfg(dev, pos + 1, 1)
        seen += 1
    return out


def test_identity_and_class():
    dev, _ = make()
    assert cfg(dev, 0, 2) == 0x1AF4 and cfg(dev, 2, 2) == 0x1048  # 0x1040 + virtio id 8
    assert cfg(dev, 8, 1) == 1  # revision 1: modern only
    assert dev.region_read(CFG, 9, 3) == bytes((0, 0, 1))  # prog-if 0, SCSI 00h, storage 01h
    assert cfg(dev, 0x2C, 2) == 0x1AF4 and cfg(dev, 0x2E, 2) == 8
    assert cfg(dev, 6, 2) & 0x10  # capability list present
    assert cfg(dev, 0x3D, 1) == 0  # no INTx


def test_capability_list():
    dev, _ = make(num_queues=4)
    c = caps(dev)
    assert c[1][1:4] == (VIRTIO_BAR, 0x0000, 0x1000)  # common
    assert c[3][1:4] == (VIRTIO_BAR, 0x1000, 0x1000)  # ISR
    assert c[4][1:4] == (VIRTIO_BAR, 0x2000, 0x1000)  # device
    assert c[2][1:5] == (VIRTIO_BAR, 0x3000, 0x1000, 4)  # notify, multiplier 4
    assert 5 in c  # PCI configuration access
    msix = c[0x111][0]
    assert cfg(dev, msix + 2, 2) & 0x7FF == 4 + 2 + 1 - 1  # one vector per queue + config
    assert cfg(dev, msix + 4, 4) == 1 and cfg(dev, msix + 8, 4) == 2  # table BAR1, PBA BAR2
    for pos in (v[0] for v in c.values()):
        assert pos % 4 == 0 and 0x40 <= pos < 0x100


def test_regions_and_irqs():
    dev, _ = make()
    regions = dev.regions()
    assert len(regions) >= 9 and regions[CFG].size == 256
    assert regions[1].size == regions[2].size == 0x1000 and regions[4].size == 0x4000
    irqs = dev.irqs()
    assert len(irqs) >= 3 and irqs[2].count == 2 + 2 + 1 and irqs[2].flags & IRQ_INFO_EVENTFD


def test_bar_sizing_and_type_bits():
    dev, _ = make()
    assert cfg(dev, 0x20, 4) & 0x7 == 0x4  # BAR4: 64-bit memory
    dev.region_write(CFG, 0x20, b"\xff" * 4)
    assert cfg(dev, 0x20, 4) == (~(0x4000 - 1) & 0xFFFFFFFF) | 0x4
    dev.region_write(CFG, 0x14, b"\xff" * 4)
    assert cfg(dev, 0x14, 4) == ~(0x1000 - 1) & 0xFFFFFFFF
    dev.region_write(CFG, 0x10, b"\xff" * 4)
    assert cfg(dev, 0x10, 4) == 0  # BAR0 not implemented
    dev.region_write(CFG, 0, b"\xff\xff\xff\xff")
    assert cfg(dev, 0, 4) == 0x10481AF4  # read-only


def test_feature_negotiation():
    dev, drv = make()
    f = drv.device_features()
    for bit in (32, 28, 29, 1, 2):  # VERSION_1, INDIRECT_DESC, EVENT_IDX, HOTPLUG, CHANGE
        assert f >> bit & 1, bit
    for bit in (0, 3, 34):  # INOUT, T10_PI, RING_PACKED: not offered
        assert not f >> bit & 1, bit
    assert not drv.negotiate(f | 1 << 0)  # a feature we did not offer: FEATURES_OK refused
    assert not drv.negotiate(f & ~(1 << 32))  # legacy driver: refused
    assert drv.negotiate(f)
    drv.common_write("driver_feature_select", 0)
    drv.common_write("driver_feature", 0)  # too late: features are fixed
    assert drv.common_read("driver_feature") == f & 0xFFFFFFFF
    assert drv.status() & STATUS_FEATURES_OK


def test_device_config():
    dev, drv = make(num_queues=3, queue_size=512)
    num_queues, seg_max, max_sectors, cmd_per_lun, evsize, sense, cdb = (
        drv.config_read(4 * k) for k in range(7)
    )
    assert (num_queues, seg_max, max_sectors, cmd_per_lun) == (3, 510, 8192, 512)
    assert (evsize, sense, cdb) == (16, 96, 32)
    assert drv.config_read(28, 2) == 0 and drv.config_read(30, 2) == 0  # max_channel, max_target
    assert drv.config_read(32) == 16383
    drv.config_write(0, 99)  # read-only field
    drv.config_write(24, 16)  # cdb_size is writable
    assert drv.config_read(0) == 3 and drv.config_read(24) == 16
    drv.common_write("device_status", 0)  # reset restores the defaults
    assert drv.config_read(24) == 32


def test_queue_registers():
    dev, drv = make(queue_size=256)
    assert drv.common_read("num_queues") == 4
    drv.common_write("queue_select", 2)
    assert drv.common_read("queue_size") == 256
    drv.common_write("queue_size", 100)  # not a power of 2: ignored
    assert drv.common_read("queue_size") == 256
    drv.common_write("queue_size", 1024)  # above the maximum: ignored
    assert drv.common_read("queue_size") == 256
    drv.common_write("queue_size", 64)
    assert drv.common_read("queue_size") == 64
    drv.common_write("queue_desc", 0x1_2345_6000)
    assert drv.common_read("queue_desc") == 0x1_2345_6000
    drv.common_write("queue_msix_vector", 999)
    assert drv.common_read("queue_msix_vector") == VIRTIO_MSI_NO_VECTOR
    drv.common_write("queue_select", 77)  # no such queue
    assert drv.common_read("queue_size") == 0


async def test_isr_read_clears_and_msix_masking(nursery):
    dev, drv = make()
    dev.attach(nursery, drv.dma)
    drv.init()
    await settle()
    dev.pci.interrupt_config()
    assert drv.interrupts(0) == 1
    assert dev.region_read(VIRTIO_BAR, ISR_OFFSET, 1)[0] & 2
    assert dev.region_read(VIRTIO_BAR, ISR_OFFSET, 1)[0] == 0
    dev.set_irq_mask(2, 0, 1, True)
    dev.pci.interrupt_config()
    assert drv.interrupts(0) == 0
    assert dev.region_read(MSIX_PBA_BAR, 0, 8)[0] & 1  # pending while masked
    dev.set_irq_mask(2, 0, 1, False)
    assert drv.interrupts(0) == 1
    assert dev.region_read(MSIX_PBA_BAR, 0, 8)[0] == 0
    # de-assigning a vector's eventfd, as QEMU does, then re-assigning it
    dev.set_irq_eventfds(2, 0, [None])
    dev.pci.interrupt_config()
    dev.set_irq_eventfds(2, 0, [os.dup(drv.irq_fds[0])])
    assert drv.interrupts(0) == 1
    dev.detach()
    drv.close()


def test_pci_cfg_access_capability():
    dev, drv = make()
    pos = caps(dev)[5][0]
    # read device_feature (common cfg 0x04) through the window: bar 4, offset 4, length 4
    dev.region_write(CFG, pos + 4, bytes((VIRTIO_BAR,)))
    dev.region_write(CFG, pos + 8, struct.pack("<II", 0x4, 4))
    assert cfg(dev, pos + 16, 4) == drv.device_features() & 0xFFFFFFFF
    # write queue_select (0x16) through it
    dev.region_write(CFG, pos + 8, struct.pack("<II", 0x16, 2))
    dev.region_write(CFG, pos + 16, struct.pack("<I", 3))
    assert drv.common_read("queue_select") == 3


def test_vring_need_event():
    assert vring_need_event(4, 5, 4)
    assert not vring_need_event(5, 5, 4)
    assert vring_need_event(0xFFFF, 0, 0xFFFE)  # wraps
    assert not vring_need_event(10, 5, 0)
