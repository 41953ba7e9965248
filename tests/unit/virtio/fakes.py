"""A fake guest for the virtio-scsi device: memory, a Linux-like driver, a target.

The driver talks to the device only through region_read/region_write (config
space and BAR4) and guest memory, the way Linux's virtio_pci_modern and
virtio_scsi do.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.testing

from bridge.scsi.interface import ScsiTarget
from bridge.scsi.request import (
    ScsiRequest,
    ScsiResponse,
    ScsiStatus,
    ServiceResponse,
    TmfRequest,
    TmfResponse,
    TmfServiceResponse,
)
from bridge.vfio_user.device import DmaError
from bridge.vfio_user.dma import DmaSpaceImpl
from bridge.virtio.pci import (
    COMMON_FIELDS,
    DEVICE_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
    NOTIFY_OFFSET,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_BAR,
)
from bridge.virtio.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

MEM_SIZE = 4 << 20
BLOCK = 512


class GuestMemory:
    """The guest's side of its memory (``mem``, at iova 0): allocate, read, write."""

    mem: bytearray | mmap.mmap
    _next = 0x10000

    def alloc(self, size: int, align: int = 64) -> int:
        addr = (self._next + align - 1) // align * align
        self._next = addr + size
        assert self._next < len(self.mem), "fake guest memory exhausted"
        return addr

    def write(self, addr: int, data: bytes) -> None:
        self.mem[addr : addr + len(data)] = data

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem[addr : addr + n])


class FakeDma(GuestMemory):
    """Guest memory: one bytearray at iova 0; [ro_start, ro_end) is mapped read-only."""

    def __init__(self, size: int = MEM_SIZE, ro: tuple[int, int] = (0, 0)) -> None:
        self.mem = bytearray(size)
        self._base = memoryview(self.mem)
        self.ro = ro
        self.unmap_callbacks: list[Callable[[int, int], None]] = []

    def view(self, iova: int, length: int, writable: bool) -> memoryview:
        if iova < 0 or length < 0 or iova + length > len(self.mem):
            raise DmaError(f"[{iova:#x}, +{length:#x}) outside guest memory")
        if writable and iova < self.ro[1] and iova + length > self.ro[0]:
            raise DmaError("write into a read-only mapping")
        return self._base[iova : iova + length]

    def on_unmap(self, callback: Callable[[int, int], None]) -> None:
        self.unmap_callbacks.append(callback)


class MemfdDma(GuestMemory, DmaSpaceImpl):
    """Guest memory as the server has it: a memfd the client mapped at iova 0 with
    DMA_MAP (the real DmaSpaceImpl); the guest reaches it through its own mapping."""

    def __init__(self, size: int = MEM_SIZE) -> None:
        DmaSpaceImpl.__init__(self)
        self.fd = os.memfd_create("vscsi-test-guest")
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)
        self.size = size
        self.map(0, size, True, True, self.fd, 0)

    def remap(self) -> None:
        """DMA_MAP of the same memory again (what QEMU sends after its DMA_UNMAP)."""
        self.map(0, self.size, True, True, self.fd, 0)

    def close(self) -> None:
        self.unmap_all()
        self.mem.close()
        os.close(self.fd)


class FakeTarget:
    """A tiny SBC-ish target: TEST UNIT READY, INQUIRY, READ(10), WRITE(10); TMFs recorded.

    Implements bridge.scsi.interface.ScsiTarget (checked below); every command runs as
    a task (submit returns the coroutine).
    """

    def __init__(self, blocks: int = 256) -> None:
        self.disk = bytearray(blocks * BLOCK)
        self.requests: list[ScsiRequest] = []
        self.tmfs: list[TmfRequest] = []
        self._subscribers = []
        self.hold: trio.Event | None = None  # when set, execute waits for it
        self.nexus_losses: list[str] = []

    def subscribe(self, callback) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def submit(self, req: ScsiRequest):
        return self.execute(req)

    def emit(self, event) -> None:
        for cb in self._subscribers:
            cb(event)

    def nexus_loss(self, initiator: str) -> None:
        self.nexus_losses.append(initiator)

    def luns_for(self, initiator) -> list[int]:
        return [0]

    async def execute(self, req: ScsiRequest) -> ScsiResponse:
        self.requests.append(req)
        if self.hold is not None:
            await self.hold.wait()
        cdb = bytes(req.cdb)
        op = cdb[0]
        if req.data_in and req.data_out:  # as the core: no bidirectional commands
            return ScsiResponse(ServiceResponse.SERVICE_DELIVERY_FAILURE)
        if req.lun != 0:
            return _check(0x05, 0x25, 0x00)
        if op == 0x00:
            return ScsiResponse()
        if op == 0x12:
            data = bytes((0, 0, 6, 2, 31, 0, 0, 2)) + b"FAKE    " + b"FAKEDISK".ljust(16) + b"0001"
            return _data_in(req, data)
        if op in (0x28, 0x2A):
            lba, blocks = struct.unpack_from(">IxH", cdb, 2)
            start, n = lba * BLOCK, blocks * BLOCK
            if start + n > len(self.disk):
                return _check(0x05, 0x21, 0x00)
            if op == 0x28:
                return _data_in(req, bytes(self.disk[start : start + n]))
            got = b"".join(bytes(v) for v in req.data_out)[:n]
            self.disk[start : start + len(got)] = got
            return ScsiResponse(residual=max(0, req.data_out_len - n))
        return _check(0x05, 0x20, 0x00)

    async def task_management(self, tmf: TmfRequest) -> TmfResponse:
        self.tmfs.append(tmf)
        return TmfResponse(TmfServiceResponse.FUNCTION_COMPLETE)


_: type[ScsiTarget] = FakeTarget  # a type checker proves FakeTarget has every call


def _check(key: int, asc: int, ascq: int) -> ScsiResponse:
    sense = bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))
    return ScsiResponse(status=ScsiStatus.CHECK_CONDITION, sense=sense)


def _data_in(req: ScsiRequest, data: bytes) -> ScsiResponse:
    done = 0
    for v in req.data_in:
        k = min(len(v), len(data) - done)
        v[:k] = data[done : done + k]
        done += k
    return ScsiResponse(residual=req.data_in_len - done)


@dataclass
class DriverQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)
    avail_idx: int = 0
    last_used: int = 0


class Driver:
    """Linux-like virtio-pci modern driver over region_read/region_write."""

    def __init__(self, dev, dma: FakeDma) -> None:
        self.dev = dev
        self.dma = dma
        self.queues: dict[int, DriverQueue] = {}
        self.irq_fds: list[int] = []

    # registers
    def common_read(self, name: str) -> int:
        off, size = COMMON_FIELDS[name]
        return int.from_bytes(self.dev.region_read(VIRTIO_BAR, off, size), "little")

    def common_write(self, name: str, value: int) -> None:
        off, size = COMMON_FIELDS[name]
        if size == 8:  # Linux writes 64-bit fields as two 32-bit halves
            self.dev.region_write(VIRTIO_BAR, off, struct.pack("<I", value & 0xFFFFFFFF))
            self.dev.region_write(VIRTIO_BAR, off + 4, struct.pack("<I", value >> 32))
        else:
            self.dev.region_write(VIRTIO_BAR, off, value.to_bytes(size, "little"))

    def config_read(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.dev.region_read(VIRTIO_BAR, DEVICE_OFFSET + off, size), "little")

    def config_write(self, off: int, value: int, size: int = 4) -> None:
        self.dev.region_write(VIRTIO_BAR, DEVICE_OFFSET + off, value.to_bytes(size, "little"))

    def device_features(self) -> int:
        self.common_write("device_feature_select", 0)
        lo = self.common_read("device_feature")
        self.common_write("device_feature_select", 1)
        return lo | self.common_read("device_feature") << 32

    def negotiate(self, features: int) -> bool:
        self.common_write("device_status", 0)
        self.common_write("device_status", STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.common_write("driver_feature_select", sel)
            self.common_write("driver_feature", (features >> (32 * sel)) & 0xFFFFFFFF)
        self.common_write("device_status", STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return bool(self.common_read("device_status") & STATUS_FEATURES_OK)

    def init(self, features: int | None = None, queue_size: int | None = None) -> None:
        if features is None:
            features = self.device_features()
        assert self.negotiate(features)
        nq = self.common_read("num_queues")
        self.common_write("config_msix_vector", 0)
        self.queues.clear()
        for q in range(nq):
            self.common_write("queue_select", q)
            size = self.common_read("queue_size")
            if queue_size is not None:
                size = queue_size
                self.common_write("queue_size", size)
            dq = DriverQueue(
                q, size, self.dma.alloc(16 * size, 16), self.dma.alloc(6 + 2 * size, 2),
                self.dma.alloc(6 + 8 * size, 4), free=list(range(size)),
            )
            self.common_write("queue_desc", dq.desc)
            self.common_write("queue_driver", dq.avail)
            self.common_write("queue_device", dq.used)
            self.common_write("queue_msix_vector", q + 1)
            assert self.common_read("queue_msix_vector") == q + 1
            assert self.common_read("queue_notify_off") == q
            self.common_write("queue_enable", 1)
            self.queues[q] = dq
        # one eventfd per vector; the device gets duplicates and owns them
        for fd in self.irq_fds:
            os.close(fd)
        self.irq_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(nq + 1)]
        self.dev.set_irq_eventfds(2, 0, [os.dup(fd) for fd in self.irq_fds])
        self.common_write(
            "device_status",
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        )

    def close(self) -> None:
        for fd in self.irq_fds:
            os.close(fd)
        self.irq_fds = []

    def interrupts(self, vector: int) -> int:
        try:
            return os.eventfd_read(self.irq_fds[vector])
        except BlockingIOError:
            return 0

    # rings
    def write_desc(self, q: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        dq = self.queues[q]
        self.dma.write(dq.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add_chain(
        self, q: int, out: list[tuple[int, int]], into: list[tuple[int, int]], indirect: bool = False
    ) -> int:
        """Post a chain of device-readable ``out`` then device-writable ``into`` buffers."""
        dq = self.queues[q]
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in into]
        if indirect:
            table = self.dma.alloc(16 * len(bufs), 16)
            for k, (a, n, f) in enumerate(bufs):
                nxt_flag = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.dma.write(table + 16 * k, struct.pack("<QIHH", a, n, f | nxt_flag, k + 1))
            head = dq.free.pop(0)
            dq.chains[head] = [head]
            self.write_desc(q, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            ids = [dq.free.pop(0) for _ in bufs]
            for k, (a, n, f) in enumerate(bufs):
                last = k + 1 == len(bufs)
                self.write_desc(q, ids[k], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else ids[k + 1])
            head = ids[0]
            dq.chains[head] = ids
        self.publish(q, head)
        return head

    def publish(self, q: int, head: int) -> None:
        dq = self.queues[q]
        self.dma.write(dq.avail + 4 + 2 * (dq.avail_idx % dq.size), struct.pack("<H", head))
        dq.avail_idx = (dq.avail_idx + 1) & 0xFFFF
        self.dma.write(dq.avail + 2, struct.pack("<H", dq.avail_idx))

    def kick(self, q: int) -> None:
        self.dev.region_write(VIRTIO_BAR, NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * q, struct.pack("<H", q))

    def used(self, q: int) -> list[tuple[int, int]]:
        dq = self.queues[q]
        idx = struct.unpack_from("<H", self.dma.mem, dq.used + 2)[0]
        out = []
        while dq.last_used != idx:
            slot = dq.last_used % dq.size
            elem = struct.unpack_from("<II", self.dma.mem, dq.used + 4 + 8 * slot)
            dq.free.extend(dq.chains.pop(elem[0], []))
            out.append(elem)
            dq.last_used = (dq.last_used + 1) & 0xFFFF
        return out

    def set_used_event(self, q: int, value: int) -> None:
        dq = self.queues[q]
        self.dma.write(dq.avail + 4 + 2 * dq.size, struct.pack("<H", value))

    def avail_event(self, q: int) -> int:
        dq = self.queues[q]
        return struct.unpack_from("<H", self.dma.mem, dq.used + 4 + 8 * dq.size)[0]

    def status(self) -> int:
        return self.common_read("device_status")


async def settle() -> None:
    """Let the device's tasks run until all of them wait."""
    await trio.testing.wait_all_tasks_blocked()


class SplitDma(FakeDma):
    """Guest memory made of two DMA maps meeting at ``boundary`` (like QEMU's RAM split)."""

    def __init__(self, boundary: int = MEM_SIZE // 2, **kw) -> None:
        super().__init__(**kw)
        self.boundary = boundary

    def view(self, iova: int, length: int, writable: bool) -> memoryview:
        if iova < self.boundary < iova + length:
            raise DmaError("range crosses two DMA maps")
        return super().view(iova, length, writable)

    def views(self, iova: int, length: int, writable: bool, limit: int | None = None
              ) -> list[memoryview]:
        if iova < self.boundary < iova + length:
            if limit is not None and limit < 2:
                raise DmaError("range spans more DMA maps than allowed")
            first = self.boundary - iova
            return [self.view(iova, first, writable),
                    self.view(self.boundary, length - first, writable)]
        return [self.view(iova, length, writable)]
