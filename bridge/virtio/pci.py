"""virtio 1.x modern PCI transport (virtio 1.2 4.1), device side, sans-I/O.

Layout (like SPDK's vfio-user virtio devices):
  BAR1  MSI-X table (4 KiB)          BAR2  MSI-X PBA (4 KiB)
  BAR4  64-bit memory BAR, 16 KiB:   0x0000 common cfg, 0x1000 ISR,
                                     0x2000 device cfg, 0x3000 notify
Config space is 256 bytes (conventional PCI) with a capability list: MSI-X,
then the virtio vendor capabilities COMMON, ISR, DEVICE, NOTIFY and PCI_CFG.
No INTx (interrupt pin 0): interrupts are MSI-X only.

The transport owns registers and interrupts; a ``VirtioDeviceModel`` owns the
device type: its features, its config bytes, what a notify or DRIVER_OK does.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import Protocol

from bridge.vfio_user.device import (
    IRQ_INFO_EVENTFD,
    PCI_CONFIG_REGION_INDEX,
    PCI_MSIX_IRQ_INDEX,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    IrqInfo,
    RegionInfo,
)
from bridge.virtio.msix import MsixVectors
from bridge.virtio.virtqueue import queue_size_valid

log = logging.getLogger(__name__)

# virtio 1.2 4.1.2 PCI identity
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040
PCI_REVISION_MODERN = 1

# virtio 1.2 2.1 device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

# virtio 1.2 6 reserved feature bits
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# virtio 1.2 4.1.4 capability cfg_type values
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_CONFIG_SIZE = 256

MSIX_TABLE_BAR = 1
MSIX_PBA_BAR = 2
VIRTIO_BAR = 4
MSIX_BAR_SIZE = 0x1000
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
WINDOW_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MAX_MSIX_VECTORS = MSIX_BAR_SIZE // 16

# Capability positions in config space.
CAP_MSIX = 0x40
CAP_COMMON = 0x4C
CAP_ISR = 0x5C
CAP_DEVICE = 0x6C
CAP_NOTIFY = 0x7C
CAP_PCI_CFG = 0x90

# virtio 1.2 4.1.4.3 struct virtio_pci_common_cfg: (offset, size) of each field
COMMON_FIELDS: dict[str, tuple[int, int]] = {
    "device_feature_select": (0x00, 4),
    "device_feature": (0x04, 4),
    "driver_feature_select": (0x08, 4),
    "driver_feature": (0x0C, 4),
    "config_msix_vector": (0x10, 2),
    "num_queues": (0x12, 2),
    "device_status": (0x14, 1),
    "config_generation": (0x15, 1),
    "queue_select": (0x16, 2),
    "queue_size": (0x18, 2),
    "queue_msix_vector": (0x1A, 2),
    "queue_enable": (0x1C, 2),
    "queue_notify_off": (0x1E, 2),
    "queue_desc": (0x20, 8),
    "queue_driver": (0x28, 8),
    "queue_device": (0x30, 8),
    "queue_notify_data": (0x38, 2),
    "queue_reset": (0x3A, 2),
}
COMMON_CFG_SIZE = 0x3C


class VirtioDeviceModel(Protocol):
    """What a virtio device type supplies to the PCI transport."""

    device_id: int

    def device_features(self) -> int: ...

    def config_read(self, offset: int, count: int) -> bytes: ...

    def config_write(self, offset: int, data: bytes) -> None: ...

    def driver_ok(self) -> None: ...

    def device_reset(self) -> None: ...

    def notify(self, queue: int) -> None: ...


@dataclass
class QueueConfig:
    """Per-queue registers of the common configuration (virtio 1.2 4.1.4.3)."""

    max_size: int
    size: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class VirtioPciTransport:
    def __init__(
        self, model: VirtioDeviceModel, num_queues: int, max_queue_size: int,
        subsystem_id: int | None = None, *, mmap_notify: bool = False,
    ) -> None:
        if not queue_size_valid(max_queue_size):
            raise ValueError(f"queue size {max_queue_size} must be a power of 2 up to 1024")
        if not 1 <= num_queues <= WINDOW_SIZE // NOTIFY_OFF_MULTIPLIER:
            raise ValueError("too many virtqueues for the notify window")
        self.model = model
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        # one vector per queue plus one for configuration changes
        self.msix = MsixVectors(min(num_queues + 1, MAX_MSIX_VECTORS))
        self._msix_table = bytearray(16 * self.msix.count)
        self._subsystem_id = model.device_id if subsystem_id is None else subsystem_id
        self._config = bytearray(PCI_CONFIG_SIZE)
        self._wmask = bytearray(PCI_CONFIG_SIZE)
        self._build_config_space()
        self.config_generation = 0
        # Polled doorbells: BAR4 is backed by a memfd and only its notify window
        # is offered for mmap (sparse area), so the guest's notify writes land in
        # memory the client mapped and never reach us; the device polls the
        # available rings instead (as SPDK's vfio-user virtio devices do).
        self.notify_memfd: int | None = None
        if mmap_notify:
            self.notify_memfd = os.memfd_create("vscsi-virtio-bar4", os.MFD_CLOEXEC)
            os.ftruncate(self.notify_memfd, VIRTIO_BAR_SIZE)
        self._reset_registers()

    # ---- state -------------------------------------------------------
    def _reset_registers(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.queues = [QueueConfig(self.max_queue_size) for _ in range(self.num_queues)]
        self.isr = 0
        self.msix.reset()

    def close(self) -> None:
        if self.notify_memfd is not None:
            os.close(self.notify_memfd)
            self.notify_memfd = None

    def reset(self) -> None:
        """Device reset (status 0 written, or DEVICE_RESET from the client)."""
        self._reset_registers()
        self.model.device_reset()

    def offered_features(self) -> int:
        return (
            self.model.device_features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
        )

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and bool(self.status & STATUS_FEATURES_OK)

    # ---- vfio-user surface ------------------------------------------
    def regions(self) -> list[RegionInfo]:
        rw = REGION_FLAG_READ | REGION_FLAG_WRITE
        out = [RegionInfo(0) for _ in range(9)]
        out[MSIX_TABLE_BAR] = RegionInfo(MSIX_BAR_SIZE, rw)
        out[MSIX_PBA_BAR] = RegionInfo(MSIX_BAR_SIZE, rw)
        if self.notify_memfd is not None:
            out[VIRTIO_BAR] = RegionInfo(
                VIRTIO_BAR_SIZE, rw | REGION_FLAG_MMAP, mmap_fd=self.notify_memfd,
                sparse_areas=[(NOTIFY_OFFSET, WINDOW_SIZE)],
            )
        else:
            out[VIRTIO_BAR] = RegionInfo(VIRTIO_BAR_SIZE, rw)
        out[PCI_CONFIG_REGION_INDEX] = RegionInfo(PCI_CONFIG_SIZE, rw)
        return out

    def irqs(self) -> list[IrqInfo]:
        out = [IrqInfo(0) for _ in range(5)]
        out[PCI_MSIX_IRQ_INDEX] = IrqInfo(self.msix.count, IRQ_INFO_EVENTFD)
        return out

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if count <= 0:
            return b""
        if index == PCI_CONFIG_REGION_INDEX:
            return self._config_read(offset, count)
        if index == VIRTIO_BAR:
            return self._bar4_read(offset, count)
        if index == MSIX_TABLE_BAR:
            return _slice(self._msix_table, offset, count)
        if index == MSIX_PBA_BAR:
            return _slice(self.msix.pba(), offset, count)
        return bytes(count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if not data:
            return
        if index == VIRTIO_BAR:
            self._bar4_write(offset, data)
        elif index == PCI_CONFIG_REGION_INDEX:
            self._config_write(offset, data)
        elif index == MSIX_TABLE_BAR:
            end = min(offset + len(data), len(self._msix_table))
            if offset < end:
                self._msix_table[offset:end] = data[: end - offset]
        # PBA and unused BARs: writes ignored (PCI 3.0 6.8.2.10: PBA is read-only)

    # ---- interrupts --------------------------------------------------
    def interrupt_queue(self, queue: int) -> None:
        self.isr |= 1
        self.msix.fire(self.queues[queue].msix_vector)

    def interrupt_config(self) -> None:
        self.isr |= 2
        self.msix.fire(self.msix_config)

    def set_needs_reset(self, reason: str) -> None:
        """virtio 1.2 2.1.2: an error the driver can only recover from by a reset."""
        if self.status & STATUS_NEEDS_RESET:
            return
        log.warning("virtio device needs reset: %s", reason)
        self.status |= STATUS_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.interrupt_config()

    # ---- PCI configuration space ------------------------------------
    def _build_config_space(self) -> None:
        c = self._config
        struct.pack_into(
            "<HH", c, 0x00, VIRTIO_PCI_VENDOR_ID,
            VIRTIO_PCI_MODERN_DEVICE_BASE + self.model.device_id,
        )
        struct.pack_into("<H", c, 0x06, 0x0010)  # status: capabilities list
        # revision 1, class 01h (mass storage) / 00h (SCSI) / prog-if 00h (virtio 1.2 5.6)
        c[0x08:0x0C] = bytes((PCI_REVISION_MODERN, 0x00, 0x00, 0x01))
        struct.pack_into("<I", c, 0x10 + 4 * MSIX_TABLE_BAR, 0x0)  # 32-bit memory
        struct.pack_into("<I", c, 0x10 + 4 * MSIX_PBA_BAR, 0x0)
        struct.pack_into("<I", c, 0x10 + 4 * VIRTIO_BAR, 0x4)  # 64-bit memory, low half
        struct.pack_into("<HH", c, 0x2C, VIRTIO_PCI_VENDOR_ID, self._subsystem_id)
        c[0x34] = CAP_MSIX
        # MSI-X (PCI 3.0 6.8.2): table size - 1, table in BAR1 at 0, PBA in BAR2 at 0
        struct.pack_into(
            "<BBHII", c, CAP_MSIX, PCI_CAP_ID_MSIX, CAP_COMMON, self.msix.count - 1,
            MSIX_TABLE_BAR, MSIX_PBA_BAR,
        )
        self._vendor_cap(CAP_COMMON, CAP_ISR, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, WINDOW_SIZE)
        self._vendor_cap(CAP_ISR, CAP_DEVICE, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, WINDOW_SIZE)
        self._vendor_cap(CAP_DEVICE, CAP_NOTIFY, VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, WINDOW_SIZE)
        self._vendor_cap(CAP_NOTIFY, CAP_PCI_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
                         WINDOW_SIZE, extra=struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        # virtio 1.2 4.1.4.9 PCI configuration access capability
        self._vendor_cap(CAP_PCI_CFG, 0, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bar=0, extra=bytes(4))
        # Writable bits
        w = self._wmask
        struct.pack_into("<H", w, 0x04, 0x0406)  # command: memory space, bus master, INTx disable
        w[0x3C] = 0xFF  # interrupt line
        struct.pack_into("<I", w, 0x10 + 4 * MSIX_TABLE_BAR, ~(MSIX_BAR_SIZE - 1) & 0xFFFFFFF0)
        struct.pack_into("<I", w, 0x10 + 4 * MSIX_PBA_BAR, ~(MSIX_BAR_SIZE - 1) & 0xFFFFFFF0)
        struct.pack_into("<I", w, 0x10 + 4 * VIRTIO_BAR, ~(VIRTIO_BAR_SIZE - 1) & 0xFFFFFFF0)
        struct.pack_into("<I", w, 0x10 + 4 * (VIRTIO_BAR + 1), 0xFFFFFFFF)
        w[CAP_MSIX + 3] = 0xC0  # MSI-X enable, function mask
        w[CAP_PCI_CFG + 4] = 0xFF  # bar
        w[CAP_PCI_CFG + 8 : CAP_PCI_CFG + 20] = b"\xff" * 12  # offset, length, data

    def _vendor_cap(
        self, pos: int, nxt: int, cfg_type: int, offset: int, length: int,
        bar: int = VIRTIO_BAR, extra: bytes = b"",
    ) -> None:
        """virtio 1.2 4.1.4 struct virtio_pci_cap (+ type-specific tail)."""
        body = struct.pack(
            "<BBBBBBxxII", PCI_CAP_ID_VNDR, nxt, 16 + len(extra), cfg_type, bar, 0, offset, length
        ) + extra
        self._config[pos : pos + len(body)] = body

    def _config_read(self, offset: int, count: int) -> bytes:
        data_at = CAP_PCI_CFG + 16
        if offset <= data_at < offset + count or data_at <= offset < data_at + 4:
            self._config[data_at : data_at + 4] = self._pci_cfg_access(None)
        return _slice(self._config, offset, count)

    def _config_write(self, offset: int, data: bytes) -> None:
        for k, b in enumerate(data):
            pos = offset + k
            if not 0 <= pos < PCI_CONFIG_SIZE:
                break
            m = self._wmask[pos]
            self._config[pos] = (self._config[pos] & ~m & 0xFF) | (b & m)
        data_at = CAP_PCI_CFG + 16
        if offset < data_at + 4 and data_at < offset + len(data):
            self._pci_cfg_access(bytes(self._config[data_at : data_at + 4]))

    def _pci_cfg_access(self, write: bytes | None) -> bytes:
        """virtio 1.2 4.1.4.9.1: a 1/2/4-byte access to bar/offset through pci_cfg_data."""
        bar = self._config[CAP_PCI_CFG + 4]
        off, length = struct.unpack_from("<II", self._config, CAP_PCI_CFG + 8)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or off % length or off + length > VIRTIO_BAR_SIZE:
            return bytes(4)
        if write is not None:
            self._bar4_write(off, write[:length])
            return write
        return self._bar4_read(off, length).ljust(4, b"\0")

    # ---- BAR4: common / ISR / device / notify -----------------------
    def _bar4_read(self, offset: int, count: int) -> bytes:
        window, rel = divmod(offset, WINDOW_SIZE)
        count = min(count, WINDOW_SIZE - rel)
        base = window * WINDOW_SIZE
        if base == COMMON_OFFSET:
            return _slice(self._common_snapshot(), rel, count)
        if base == ISR_OFFSET:
            # virtio 1.2 4.1.4.5: reading the ISR status clears it
            value = self.isr
            self.isr = 0
            return _slice(bytes((value,)), rel, count)
        if base == DEVICE_OFFSET:
            return self.model.config_read(rel, count)
        return bytes(count)

    def _bar4_write(self, offset: int, data: bytes) -> None:
        window, rel = divmod(offset, WINDOW_SIZE)
        data = data[: WINDOW_SIZE - rel]
        base = window * WINDOW_SIZE
        if base == COMMON_OFFSET:
            self._common_write(rel, data)
        elif base == DEVICE_OFFSET:
            self.model.config_write(rel, data)
        elif base == NOTIFY_OFFSET:
            # virtio 1.2 4.1.4.4: queue_notify_off(q) * multiplier locates q's doorbell
            queue = rel // NOTIFY_OFF_MULTIPLIER
            if queue < self.num_queues and self.driver_ok:
                self.model.notify(queue)

    def _selected(self) -> QueueConfig | None:
        if self.queue_select < self.num_queues:
            return self.queues[self.queue_select]
        return None

    def _common_values(self) -> dict[str, int]:
        q = self._selected()
        sel = self.device_feature_select
        return {
            "device_feature_select": sel,
            "device_feature": (self.offered_features() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0,
            "driver_feature_select": self.driver_feature_select,
            "driver_feature": (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if self.driver_feature_select < 2 else 0,
            "config_msix_vector": self.msix_config,
            "num_queues": self.num_queues,
            "device_status": self.status,
            "config_generation": self.config_generation,
            "queue_select": self.queue_select,
            "queue_size": q.size if q else 0,
            "queue_msix_vector": q.msix_vector if q else VIRTIO_MSI_NO_VECTOR,
            "queue_enable": int(q.enabled) if q else 0,
            "queue_notify_off": self.queue_select if q else 0,
            "queue_desc": q.desc if q else 0,
            "queue_driver": q.driver if q else 0,
            "queue_device": q.device if q else 0,
            "queue_notify_data": self.queue_select if q else 0,
            "queue_reset": 0,
        }

    def _common_snapshot(self) -> bytes:
        out = bytearray(COMMON_CFG_SIZE)
        for name, value in self._common_values().items():
            off, size = COMMON_FIELDS[name]
            out[off : off + size] = _le(value, size)
        return bytes(out)

    def _common_write(self, rel: int, data: bytes) -> None:
        end = rel + len(data)
        values = None
        for name, (off, size) in COMMON_FIELDS.items():
            if off >= end or off + size <= rel:
                continue
            if values is None:
                values = self._common_values()
            # merge a partial write (e.g. the two 32-bit halves of queue_desc)
            cur = bytearray(_le(values[name], size))
            lo = max(off, rel)
            hi = min(off + size, end)
            cur[lo - off : hi - off] = data[lo - rel : hi - rel]
            self._set_common(name, int.from_bytes(cur, "little"))
            values = None

    def _set_common(self, name: str, value: int) -> None:
        q = self._selected()
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            if self.status & STATUS_FEATURES_OK or self.driver_feature_select > 1:
                return  # virtio 1.2 3.1.1: features are fixed once FEATURES_OK is set
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif name == "config_msix_vector":
            self.msix_config = value if value < self.msix.count else VIRTIO_MSI_NO_VECTOR
        elif name == "device_status":
            self._write_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif q is None:
            return
        elif name == "queue_msix_vector":
            q.msix_vector = value if value < self.msix.count else VIRTIO_MSI_NO_VECTOR
        elif q.enabled:
            return  # virtio 1.2 4.1.4.3.2: queue layout is fixed once enabled
        elif name == "queue_size":
            if queue_size_valid(value) and value <= q.max_size:
                q.size = value
        elif name == "queue_desc":
            q.desc = value
        elif name == "queue_driver":
            q.driver = value
        elif name == "queue_device":
            q.device = value
        elif name == "queue_enable" and value == 1:
            q.enabled = True
            if self.driver_ok:
                self.model.notify(self.queue_select)

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            if not self._features_acceptable():
                value &= ~STATUS_FEATURES_OK  # virtio 1.2 2.2.2: device refuses by not setting it
        value |= old & (STATUS_NEEDS_RESET | STATUS_FEATURES_OK)
        self.status = value
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK and value & STATUS_FEATURES_OK:
            self.model.driver_ok()

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        return not f & ~self.offered_features() and bool(f >> VIRTIO_F_VERSION_1 & 1)


def _slice(buf: bytes | bytearray, offset: int, count: int) -> bytes:
    out = bytes(buf[offset : offset + count]) if offset < len(buf) else b""
    return out + bytes(count - len(out))
