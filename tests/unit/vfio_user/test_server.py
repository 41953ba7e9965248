"""serve() driven over a real unix socket by a protocol-level test client."""

from __future__ import annotations

import array
import errno
import json
import os
import shutil
import socket as stdsocket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from bridge.startup import StartupError
from bridge.vfio_user import protocol as p
from bridge.vfio_user.device import (
    IRQ_INFO_EVENTFD,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    DmaError,
    DmaSpace,
    IrqInfo,
    RegionInfo,
)
from bridge.vfio_user.server import serve
from tests.hostile.client import dma_map
from tests.hostile.client import sealed_memfd as memfd

RW = REGION_FLAG_READ | REGION_FLAG_WRITE


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vfu-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
BUG_OFFSET = 0xFF0  # region_write here raises, to check device bugs become EIO


class DummyDevice:
    """Nine PCI regions (BAR0 registers, BAR1 mmap-able memfd, config) and five IRQ indexes."""

    def __init__(self) -> None:
        self.bar0 = bytearray(0x1000)
        self.config = bytearray(256)
        self.config[0:4] = struct.pack("<HH", 0x1234, 0x5678)
        self.bar1_fd = os.memfd_create("bar1")
        os.ftruncate(self.bar1_fd, 0x2000)
        self.vectors: list[int | None] = [None] * 4
        self.masked: dict[tuple[int, int], bool] = {}
        self.attached = 0
        self.detached = 0
        self.resets = 0
        self.dma: DmaSpace | None = None
        self.on_attach = None  # optional async task started in the client's nursery

    def regions(self) -> list[RegionInfo]:
        return [
            RegionInfo(0x1000, RW),
            RegionInfo(0x2000, RW | REGION_FLAG_MMAP, mmap_fd=self.bar1_fd,
                       sparse_areas=[(0x1000, 0x1000)]),
            RegionInfo(0), RegionInfo(0), RegionInfo(0), RegionInfo(0), RegionInfo(0),
            RegionInfo(256, RW),
            RegionInfo(0),
        ]

    def irqs(self) -> list[IrqInfo]:
        return [IrqInfo(1, IRQ_INFO_EVENTFD), IrqInfo(0), IrqInfo(4, IRQ_INFO_EVENTFD),
                IrqInfo(0), IrqInfo(0)]

    def _space(self, index: int) -> bytearray:
        return self.bar0 if index == 0 else self.config

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self._space(index)[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == 0 and offset == BUG_OFFSET:
            raise RuntimeError("device bug")
        self._space(index)[offset : offset + len(data)] = data

    def set_irq_eventfds(self, index: int, start: int, fds: list[int | None]) -> None:
        if index != 2:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            return
        for i, fd in enumerate(fds):
            old = self.vectors[start + i]
            if old is not None:
                os.close(old)
            self.vectors[start + i] = fd

    def set_irq_mask(self, index: int, start: int, count: int, masked: bool) -> None:
        for i in range(start, start + count):
            self.masked[(index, i)] = masked

    def attach(self, nursery: trio.Nursery, dma: DmaSpace) -> None:
        self.attached += 1
        self.dma = dma
        if self.on_attach is not None:
            nursery.start_soon(self.on_attach, dma)

    def detach(self) -> None:
        self.detached += 1
        self.dma = None
        self.set_irq_eventfds(2, 0, [None] * 4)

    def reset(self) -> None:
        self.resets += 1
        self.bar0[:] = bytes(len(self.bar0))


class Client:
    """A vfio-user client written from the spec, independent of the server's decoder."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.next_id = 100

    async def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            anc = [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", fds))]
            sent = await self.sock.sendmsg([data], anc)
        else:
            sent = await self.sock.send(data)
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    async def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = await self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    async def recv(self) -> tuple[p.Header, bytes, list[int]]:
        data, anc, _flags, _ = await self.sock.recvmsg(16, stdsocket.CMSG_SPACE(16 * 4))
        if not data:
            raise EOFError
        data += await self._exact(16 - len(data))
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(raw)
                fds.extend(arr)
        hdr = p.Header(*struct.unpack("=HHIII", data))
        return hdr, await self._exact(hdr.size - 16), fds

    async def call(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = (),
                   flags: int = 0) -> tuple[p.Header, bytes, list[int]]:
        msg_id = self.next_id
        self.next_id += 1
        await self.send_raw(p.encode_message(msg_id, command, payload, flags), fds)
        hdr, body, rfds = await self.recv()
        assert hdr.msg_id == msg_id and hdr.command == command
        assert hdr.flags & p.FLAG_TYPE_MASK == p.TYPE_REPLY
        return hdr, body, rfds

    async def expect_error(self, command: int, payload: bytes = b"",
                           fds: tuple[int, ...] = ()) -> int:
        hdr, body, _ = await self.call(command, payload, fds)
        assert hdr.flags & p.FLAG_ERROR, f"expected an error reply, got {hdr}"
        assert hdr.size == 16 and body == b""
        return hdr.error

    async def handshake(self) -> dict:
        caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576,
                                 "pgsizes": 4096, "max_dma_maps": 65535,
                                 "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
                                 "write_multiple": True}}
        payload = struct.pack("=HH", 0, 0) + json.dumps(caps).encode() + b"\0"
        hdr, body, _ = await self.call(p.Command.VERSION, payload)
        assert not hdr.flags & p.FLAG_ERROR
        assert hdr.size <= 16 + len(payload)  # QEMU's receive buffer is its request size
        major, minor = struct.unpack_from("=HH", body)
        assert (major, minor) == (0, 0)
        assert body.endswith(b"\0")
        return json.loads(body[4:-1])["capabilities"]

    async def info(self) -> tuple[int, int, int]:
        hdr, body, _ = await self.call(p.Command.DEVICE_GET_INFO, struct.pack("=IIII", 16, 0, 0, 0))
        assert not hdr.flags & p.FLAG_ERROR
        _argsz, flags, nreg, nirq = struct.unpack("=IIII", body)
        return flags, nreg, nirq


@asynccontextmanager
async def running(tmp_path: Path, device: DummyDevice) -> AsyncIterator[str]:
    path = str(tmp_path / "vfu.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, path, device)
        yield path
        nursery.cancel_scope.cancel()


async def connect(path: str) -> Client:
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    await sock.connect(path)
    return Client(sock)


async def wait_for(condition, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


def irq_set(flags: int, index: int, start: int, count: int) -> bytes:
    return struct.pack("=IIIII", 20, flags, index, start, count)


EVENTFD_TRIGGER = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER


async def test_handshake_and_device_info(tmp_path: Path) -> None:
    dev = DummyDevice()
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        caps = await c.handshake()
        assert caps == {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096,
                        "max_dma_maps": 65535, "write_multiple": True}
        flags, nreg, nirq = await c.info()
        assert flags == p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET
        assert (nreg, nirq) == (9, 5)
        hdr, body, _ = await c.call(p.Command.DEVICE_GET_IRQ_INFO,
                                    struct.pack("=IIII", 16, 0, 2, 0))
        assert struct.unpack("=IIII", body) == (16, IRQ_INFO_EVENTFD, 2, 4)
        hdr, body, _ = await c.call(p.Command.DEVICE_GET_REGION_INFO,
                                    struct.pack("=IIIIQQ", 32, 0, 7, 0, 0, 0))
        assert struct.unpack("=IIIIQQ", body) == (32, RW, 7, 0, 256, 0)
        assert dev.attached == 1


async def test_short_version_request_gets_a_reply_that_fits(tmp_path: Path) -> None:
    async with running(tmp_path, DummyDevice()) as path:
        c = await connect(path)
        payload = struct.pack("=HH", 0, 0) + b'{"capabilities":{}}\0'
        hdr, body, _ = await c.call(p.Command.VERSION, payload)
        assert not hdr.flags & p.FLAG_ERROR
        assert hdr.size <= 16 + len(payload) and body.endswith(b"\0")
        json.loads(body[4:-1])


async def test_dma_map_with_memfd_is_visible_to_the_device(tmp_path: Path) -> None:
    dev = DummyDevice()
    ram = memfd(1 << 20)
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        hdr, _, _ = await c.call(p.Command.DMA_MAP, dma_map(0x100000, 0x80000, 0x10000), (ram,))
        assert not hdr.flags & p.FLAG_ERROR
        hdr, _, _ = await c.call(p.Command.DMA_MAP, dma_map(0xF0000, 0x10000, flags=1))  # no fd
        assert not hdr.flags & p.FLAG_ERROR
        os.pwrite(ram, b"guest data", 0x10000 + 0x40)
        assert dev.dma is not None
        assert bytes(dev.dma.view(0x100040, 10, False)) == b"guest data"
        dev.dma.view(0x100080, 4, True)[:] = b"resp"
        assert os.pread(ram, 4, 0x10080) == b"resp"
        hdr, body, _ = await c.call(p.Command.DMA_UNMAP, struct.pack("=IIQQ", 24, 0, 0x100000,
                                                                      0x80000))
        assert not hdr.flags & p.FLAG_ERROR and len(body) == 24
        with pytest.raises(DmaError):
            dev.dma.view(0x100040, 10, False)
        hdr, _, _ = await c.call(p.Command.DMA_UNMAP, struct.pack("=IIQQ", 24, 2, 0, 0))
        assert not hdr.flags & p.FLAG_ERROR
    os.close(ram)


async def test_region_info_sends_the_mmap_fd_and_sparse_cap(tmp_path: Path) -> None:
    dev = DummyDevice()
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        hdr, body, fds = await c.call(p.Command.DEVICE_GET_REGION_INFO,
                                      struct.pack("=IIIIQQ", 32, 0, 1, 0, 0, 0))
        argsz, flags, index, cap_offset, size, _off = struct.unpack_from("=IIIIQQ", body)
        assert len(body) == 32 and argsz == 64 and cap_offset == 32 and size == 0x2000
        assert flags & REGION_FLAG_MMAP and flags & p.REGION_INFO_FLAG_CAPS
        for fd in fds:
            os.close(fd)
        hdr, body, fds = await c.call(p.Command.DEVICE_GET_REGION_INFO,
                                      struct.pack("=IIIIQQ", 64, 0, 1, 0, 0, 0))
        assert len(body) == 64
        assert struct.unpack_from("=HHIIIQQ", body, 32) == (1, 1, 0, 1, 0, 0x1000, 0x1000)
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(dev.bar1_fd).st_ino
        os.close(fds[0])


async def test_region_read_write_multi_and_posted_writes(tmp_path: Path) -> None:
    dev = DummyDevice()
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        hdr, body, _ = await c.call(p.Command.REGION_READ, struct.pack("=QII", 0, 7, 4))
        assert body == struct.pack("=QII", 0, 7, 4) + struct.pack("<HH", 0x1234, 0x5678)
        hdr, body, _ = await c.call(p.Command.REGION_WRITE,
                                    struct.pack("=QII", 0x10, 0, 4) + b"\1\2\3\4")
        assert body == struct.pack("=QII", 0x10, 0, 4) and dev.bar0[0x10:0x14] == b"\1\2\3\4"
        # Posted (NO_REPLY) write then WRITE_MULTI: no replies, applied in order.
        await c.send_raw(p.encode_message(1, p.Command.REGION_WRITE,
                                          struct.pack("=QII", 0x20, 0, 2) + b"ab",
                                          p.FLAG_NO_REPLY))
        await c.send_raw(p.encode_message(2, p.Command.REGION_WRITE_MULTI,
                                          p.encode_write_multi([(0x30, 0, b"x"),
                                                                (0x31, 0, b"yz")]),
                                          p.FLAG_NO_REPLY))
        hdr, body, _ = await c.call(p.Command.REGION_READ, struct.pack("=QII", 0x20, 0, 0x14))
        assert body[16:] == b"ab" + bytes(14) + b"xyz" + bytes(1)
        hdr, _, _ = await c.call(p.Command.DEVICE_RESET)
        assert not hdr.flags & p.FLAG_ERROR and dev.resets == 1


async def test_set_irqs_like_qemu_dynamic_msix(tmp_path: Path) -> None:
    dev = DummyDevice()
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        # Enable MSI-X with vector 0 and an invalid fd: a -1 chunk carries no fds.
        hdr, _, _ = await c.call(p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 0, 1))
        assert not hdr.flags & p.FLAG_ERROR and dev.vectors == [None] * 4
        efds = [os.eventfd(0) for _ in range(2)]
        for n, fd in enumerate(efds):
            hdr, _, _ = await c.call(p.Command.DEVICE_SET_IRQS,
                                     irq_set(EVENTFD_TRIGGER, 2, n + 1, 1), (fd,))
            assert not hdr.flags & p.FLAG_ERROR
        assert dev.vectors[0] is None and all(v is not None for v in dev.vectors[1:3])
        # The device got its own copies: triggering one signals ours.
        os.eventfd_write(dev.vectors[1], 1)
        assert os.eventfd_read(efds[0]) == 1
        hdr, _, _ = await c.call(p.Command.DEVICE_SET_IRQS,
                                 irq_set(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 2, 1, 2))
        assert dev.masked == {(2, 1): True, (2, 2): True}
        hdr, _, _ = await c.call(p.Command.DEVICE_SET_IRQS,
                                 irq_set(p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_UNMASK, 2, 1, 2)
                                 + b"\0\1")
        assert dev.masked == {(2, 1): True, (2, 2): False}
        # count 0 + DATA_NONE + TRIGGER disables the whole index.
        hdr, _, _ = await c.call(p.Command.DEVICE_SET_IRQS,
                                 irq_set(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 2, 0, 0))
        assert not hdr.flags & p.FLAG_ERROR and dev.vectors == [None] * 4
        # INTx index 0 is accepted too.
        hdr, _, _ = await c.call(p.Command.DEVICE_SET_IRQS,
                                 irq_set(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 0, 1))
        assert not hdr.flags & p.FLAG_ERROR
        for fd in efds:
            os.close(fd)


async def test_commands_before_version_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path, DummyDevice()) as path:
        c = await connect(path)
        assert await c.expect_error(p.Command.DEVICE_GET_INFO,
                                    struct.pack("=IIII", 16, 0, 0, 0)) == errno.EINVAL
        await c.handshake()
        await c.info()


def _malformed_cases(ram: int) -> list[tuple[str, int, bytes, tuple[int, ...], int]]:
    info = struct.pack("=IIII", 16, 0, 0, 0)
    return [
        ("second VERSION", p.Command.VERSION, b"\0\0\0\0{}\0", (), errno.EINVAL),
        ("short DMA_MAP", p.Command.DMA_MAP, dma_map(0, 0x1000)[:20], (), errno.EINVAL),
        ("DMA_MAP two fds", p.Command.DMA_MAP, dma_map(0x0, 0x1000), (ram, ram), errno.EINVAL),
        ("DMA_MAP overlap", p.Command.DMA_MAP, dma_map(0x1800, 0x1000), (ram,), errno.EEXIST),
        ("DMA_UNMAP nothing", p.Command.DMA_UNMAP, struct.pack("=IIQQ", 24, 0, 0x9000, 0x1000),
         (), errno.ENOENT),
        ("DMA_UNMAP dirty bitmap", p.Command.DMA_UNMAP,
         struct.pack("=IIQQ", 24, 1, 0x1000, 0x1000), (), errno.ENOTSUP),
        ("unknown command", 99, b"", (), errno.ENOSYS),
        ("unsupported command", p.Command.DEVICE_GET_REGION_IO_FDS, bytes(16), (),
         errno.ENOTSUP),
        ("server-to-client command", p.Command.DMA_READ, bytes(16), (), errno.ENOSYS),
        ("bad region index", p.Command.REGION_READ, struct.pack("=QII", 0, 50, 4), (),
         errno.EINVAL),
        ("offset past region", p.Command.REGION_READ, struct.pack("=QII", 0xFFE, 0, 4), (),
         errno.EINVAL),
        ("offset wraps", p.Command.REGION_READ, struct.pack("=QII", 2**64 - 2, 0, 4), (),
         errno.EINVAL),
        ("count too big", p.Command.REGION_READ, struct.pack("=QII", 0, 0, 4 << 20), (),
         errno.E2BIG),
        ("empty region", p.Command.REGION_READ, struct.pack("=QII", 0, 3, 1), (),
         errno.EINVAL),
        ("write count mismatch", p.Command.REGION_WRITE, struct.pack("=QII", 0, 0, 8) + b"ab",
         (), errno.EINVAL),
        ("write with fd", p.Command.REGION_WRITE, struct.pack("=QII", 0, 0, 1) + b"a", (ram,),
         errno.EINVAL),
        ("write-multi bad entry", p.Command.REGION_WRITE_MULTI,
         p.encode_write_multi([(0, 0, b"a"), (0, 42, b"b")]), (), errno.EINVAL),
        ("region info argsz", p.Command.DEVICE_GET_REGION_INFO,
         struct.pack("=IIIIQQ", 8, 0, 0, 0, 0, 0), (), errno.EINVAL),
        ("region info index", p.Command.DEVICE_GET_REGION_INFO,
         struct.pack("=IIIIQQ", 32, 0, 9, 0, 0, 0), (), errno.EINVAL),
        ("irq info index", p.Command.DEVICE_GET_IRQ_INFO, struct.pack("=IIII", 16, 0, 5, 0),
         (), errno.EINVAL),
        ("device info argsz", p.Command.DEVICE_GET_INFO, info[:8], (), errno.EINVAL),
        ("irq index", p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 7, 0, 1), (),
         errno.EINVAL),
        ("irq vectors past count", p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 3, 2),
         (), errno.EINVAL),
        ("irq fd count", p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 0, 3),
         (ram, ram), errno.EINVAL),
        ("irq fds without eventfd", p.Command.DEVICE_SET_IRQS,
         irq_set(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 2, 0, 1), (ram,), errno.EINVAL),
        ("irq two data types", p.Command.DEVICE_SET_IRQS,
         irq_set(p.IRQ_SET_DATA_NONE | p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, 2, 0, 1),
         (), errno.EINVAL),
        ("too many fds", p.Command.DMA_MAP, dma_map(0x8000, 0x1000), (ram,) * 20, errno.EINVAL),
        ("device bug", p.Command.REGION_WRITE, struct.pack("=QII", BUG_OFFSET, 0, 1) + b"a", (),
         errno.EIO),
    ]


async def test_every_malformed_message_gets_its_errno_and_serving_goes_on(
        tmp_path: Path) -> None:
    dev = DummyDevice()
    ram = memfd(1 << 20)
    fds_before = len(os.listdir("/proc/self/fd"))
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        hdr, _, _ = await c.call(p.Command.DMA_MAP, dma_map(0x1000, 0x1000), (ram,))
        assert not hdr.flags & p.FLAG_ERROR
        for name, command, payload, fds, want in _malformed_cases(ram):
            got = await c.expect_error(command, payload, fds)
            assert got == want, f"{name}: errno {got}, want {want}"
            assert await c.info() == (3, 9, 5), name
        # A message-type that is neither command nor reply.
        await c.send_raw(p.encode_message(5, p.Command.DEVICE_RESET, b"", 0x2))
        hdr, _, _ = await c.recv()
        assert hdr.flags & p.FLAG_ERROR and hdr.error == errno.EINVAL
        # Oversized: refused with E2BIG, its body skipped, the stream stays in sync.
        big = p.encode_message(6, p.Command.REGION_WRITE,
                               struct.pack("=QII", 0, 0, 2 << 20) + bytes(2 << 20))
        await c.send_raw(big)
        hdr, _, _ = await c.recv()
        assert hdr.msg_id == 6 and hdr.error == errno.E2BIG
        assert await c.info() == (3, 9, 5)
        # NO_REPLY errors are silent, the next request is still answered.
        await c.send_raw(p.encode_message(7, 99, b"", p.FLAG_NO_REPLY))
        assert await c.info() == (3, 9, 5)
        c.sock.close()
        await wait_for(lambda: dev.detached == 1)
        assert dev.detached == 1
    os.close(ram)
    # No fd leaked by refusals (the server closed every fd it was sent and refused).
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_framing_error_closes_only_that_client(tmp_path: Path) -> None:
    dev = DummyDevice()
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        await c.send_raw(p.HEADER.pack(1, 4, 8, 0, 0))  # size smaller than a header
        with pytest.raises(EOFError):
            await c.recv()
        c2 = await connect(path)
        await c2.handshake()
        assert await c2.info() == (3, 9, 5)
        assert dev.attached == 2 and dev.detached == 1


async def test_disconnect_drops_maps_and_reconnect_keeps_device_state(tmp_path: Path) -> None:
    dev = DummyDevice()
    ram = memfd(1 << 20)
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        await c.call(p.Command.DMA_MAP, dma_map(0, 1 << 20), (ram,))
        efd = os.eventfd(0)
        await c.call(p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 0, 1), (efd,))
        os.close(efd)
        await c.call(p.Command.REGION_WRITE, struct.pack("=QII", 0x40, 0, 4) + b"keep")
        dma = dev.dma
        assert dma is not None
        held = dma.view(0, 16, True)  # a device that forgets to drop a view
        c.sock.close()
        await wait_for(lambda: dev.detached == 1)
        assert dev.detached == 1 and dev.vectors == [None] * 4
        with pytest.raises(DmaError):
            dma.view(0, 16, False)  # maps gone
        held[:4] = b"safe"  # the deferred mapping is still valid memory
        held.release()
        c2 = await connect(path)
        await c2.handshake()
        hdr, body, _ = await c2.call(p.Command.REGION_READ, struct.pack("=QII", 0x40, 0, 4))
        assert body[16:] == b"keep"
        assert dev.attached == 2 and dev.dma is not None and dev.dma is not dma
    os.close(ram)


async def test_device_reaches_fdless_memory_with_dma_read_write(tmp_path: Path) -> None:
    dev = DummyDevice()
    results: list[object] = []
    doorbell = trio.Event()
    dev.region_write = lambda index, offset, data: doorbell.set()  # type: ignore[method-assign]

    async def device_task(dma) -> None:
        await doorbell.wait()
        results.append(await dma.read(0xF0010, 6))
        await dma.write(0xF0020, b"out")
        results.append("written")

    dev.on_attach = device_task
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        await c.call(p.Command.DMA_MAP, dma_map(0xF0000, 0x10000))  # no fd
        await c.send_raw(p.encode_message(9, p.Command.REGION_WRITE,
                                          struct.pack("=QII", 0, 0, 1) + b"\1", p.FLAG_NO_REPLY))
        # DMA_READ as QEMU 11.1 reads it: 32 bytes, address u64, count u64.
        hdr, body, _ = await c.recv()
        assert hdr.command == p.Command.DMA_READ and hdr.size == 32
        assert struct.unpack_from("=QQ", body) == (0xF0010, 6)
        reply = p.HEADER.pack(hdr.msg_id, hdr.command, 32 + 6, p.TYPE_REPLY, 0)
        await c.send_raw(reply + struct.pack("=QQ", 0xF0010, 6) + b"romdat")
        hdr, body, _ = await c.recv()
        assert hdr.command == p.Command.DMA_WRITE and hdr.size == 32 + 3
        assert struct.unpack_from("=QQ", body) == (0xF0020, 3) and body[16:19] == b"out"
        await c.send_raw(p.HEADER.pack(hdr.msg_id, hdr.command, 16, p.TYPE_REPLY, 0))
        await wait_for(lambda: len(results) == 2)
        assert results == [b"romdat", "written"]


async def test_stale_socket_is_replaced_but_a_regular_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "vfu.sock"
    stale = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    async with running(tmp_path, DummyDevice()):
        c = await connect(str(path))
        await c.handshake()
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(StartupError, match="exists and is not a socket"):
        await serve(str(other), DummyDevice())
    assert other.read_text() == "x"


async def test_dma_read_refused_or_unanswered_becomes_dma_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bridge.vfio_user.server as server_mod

    monkeypatch.setattr(server_mod, "DMA_REQUEST_TIMEOUT", 0.2)
    dev = DummyDevice()
    errors: list[str] = []
    doorbell = trio.Event()
    dev.region_write = lambda index, offset, data: doorbell.set()  # type: ignore[method-assign]

    async def device_task(dma) -> None:
        await doorbell.wait()
        for _ in range(2):
            try:
                await dma.read(0xF0000, 4)
            except DmaError as exc:
                errors.append(str(exc))

    dev.on_attach = device_task
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        await c.call(p.Command.DMA_MAP, dma_map(0xF0000, 0x1000))  # no fd
        await c.send_raw(p.encode_message(9, p.Command.REGION_WRITE,
                                          struct.pack("=QII", 0, 0, 1) + b"\1", p.FLAG_NO_REPLY))
        hdr, _, _ = await c.recv()  # first DMA_READ: refused like QEMU without bus master
        assert hdr.command == p.Command.DMA_READ
        await c.send_raw(p.HEADER.pack(hdr.msg_id, hdr.command, 16,
                                       p.TYPE_REPLY | p.FLAG_ERROR, errno.ENODEV))
        hdr, _, _ = await c.recv()  # second: never answered
        assert hdr.command == p.Command.DMA_READ
        await wait_for(lambda: len(errors) == 2)
        assert "No such device" in errors[0] and "no reply" in errors[1]
        assert await c.info() == (3, 9, 5)  # the connection still serves


async def test_version_reply_is_a_subset_of_the_client_offer(tmp_path: Path) -> None:
    async with running(tmp_path, DummyDevice()) as path:
        c = await connect(path)
        caps = {"capabilities": {"max_msg_fds": 4, "max_data_xfer_size": 65536,
                                 "max_dma_maps": 100, "pgsizes": 4096}}
        payload = struct.pack("=HH", 0, 0) + json.dumps(caps).encode() + b"\0"
        hdr, body, _ = await c.call(p.Command.VERSION, payload)
        assert not hdr.flags & p.FLAG_ERROR
        got = json.loads(body[4:-1])["capabilities"]
        assert got == {"max_msg_fds": 4, "max_data_xfer_size": 65536, "pgsizes": 4096,
                       "max_dma_maps": 100}


@pytest.mark.parametrize("caps, want", [
    (b'{"capabilities":{"max_msg_fds":"x"}}', errno.EINVAL),
    (b'{"capabilities":{"pgsizes":8192}}', errno.EINVAL),
    (b'{"capabilities":[]}', errno.EINVAL),
])
async def test_bad_version_requests_are_refused_then_a_good_one_works(
        tmp_path: Path, caps: bytes, want: int) -> None:
    async with running(tmp_path, DummyDevice()) as path:
        c = await connect(path)
        assert await c.expect_error(p.Command.VERSION, struct.pack("=HH", 0, 0) + caps + b"\0") \
            == want
        assert await c.expect_error(p.Command.VERSION, struct.pack("=HH", 1, 0) + b"{}\0") \
            == errno.ENOTSUP
        await c.handshake()


async def test_cancelling_serve_detaches_the_client_and_removes_the_socket(
        tmp_path: Path) -> None:
    dev = DummyDevice()
    ram = memfd(1 << 16)
    path = str(tmp_path / "vfu.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, path, dev)
        c = await connect(path)
        await c.handshake()
        await c.call(p.Command.DMA_MAP, dma_map(0, 1 << 16), (ram,))
        dma = dev.dma
        nursery.cancel_scope.cancel()
    assert dev.detached == 1 and not os.path.exists(path)
    with pytest.raises(DmaError):
        dma.view(0, 1, False)
    os.close(ram)


async def test_a_crashing_device_task_ends_that_client_only(tmp_path: Path) -> None:
    dev = DummyDevice()
    doorbell = trio.Event()
    dev.region_write = lambda index, offset, data: doorbell.set()  # type: ignore[method-assign]

    async def device_task(dma) -> None:
        await doorbell.wait()
        raise RuntimeError("device task bug")

    dev.on_attach = device_task
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        await c.send_raw(p.encode_message(9, p.Command.REGION_WRITE,
                                          struct.pack("=QII", 0, 0, 1) + b"\1", p.FLAG_NO_REPLY))
        with pytest.raises(EOFError):
            await c.recv()
        assert dev.detached == 1
        dev.on_attach = None
        c2 = await connect(path)
        await c2.handshake()
        assert await c2.info() == (3, 9, 5)
