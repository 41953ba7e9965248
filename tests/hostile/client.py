"""vfio-user clients for the hostile harness: a raw one, and a well-behaved guest.

Both speak vfio-user from the spec over blocking unix sockets (no trio: the
good guest runs in a thread beside the attacks). ``GoodGuest`` is a guest
as QEMU + Linux make it: VERSION, guest RAM in a sealed memfd (DMA_MAP),
MSI-X eventfds (SET_IRQS), and a virtio-scsi driver
(tests/unit/virtio/fakes.Driver) issuing WRITE(10)/READ(10) through a
virtqueue, each checked, plus a DMA_MAP/DMA_UNMAP round trip now and then.
"""

from __future__ import annotations

import array
import fcntl
import json
import mmap
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bridge.vfio_user import protocol as p
from tests.unit.virtio.fakes import Driver, FakeDma

VERSION_CAPS = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20,
                                 "pgsizes": 4096, "max_dma_maps": 65535}}
EVENTFD_TRIGGER = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
MSIX = 2  # VFIO_PCI_MSIX_IRQ_INDEX
RQ = 2  # the first virtio-scsi request queue
RESP_LEN = 12 + 96  # virtio_scsi_resp_cmd with the default 96-byte sense
REQ_LEN = 51  # virtio_scsi_req_cmd with a 32-byte CDB
BLOCK = 512
PACE = 0.005  # the good guest's pause between requests: it shares 2 cores with the attacks


def sealed_memfd(size: int, name: str = "guest-ram") -> int:
    """Guest RAM as QEMU's memory-backend-memfd (seal=on) makes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def make_fd(kind: str) -> int:
    """An fd of one kind a hostile client may send: "sealed" (as QEMU's guest RAM),
    "unsealed" memfd, "pipe" (nobody reads it), "eventfd", "file" (a plain file)."""
    if kind == "sealed":
        return sealed_memfd(0x4000, "fuzz")
    if kind == "unsealed":
        fd = os.memfd_create("fuzz-unsealed")
        os.ftruncate(fd, 0x4000)
        return fd
    if kind == "pipe":
        r, w = os.pipe()
        os.close(r)
        return w
    if kind == "eventfd":
        return os.eventfd(0)
    fd, name = tempfile.mkstemp()
    os.unlink(name)
    return fd


def version_payload(caps: dict | None = None) -> bytes:
    return struct.pack("=HH", 0, 0) + json.dumps(caps or VERSION_CAPS).encode() + b"\0"


def dma_map(iova: int, size: int, offset: int = 0, flags: int = 3) -> bytes:
    return p.DMA_MAP.pack(p.DMA_MAP.size, flags, offset, iova, size)


def dma_unmap(iova: int, size: int, flags: int = 0) -> bytes:
    return p.DMA_UNMAP.pack(p.DMA_UNMAP.size, flags, iova, size)


def irq_set(flags: int, index: int, start: int, count: int) -> bytes:
    return p.IRQ_SET.pack(p.IRQ_SET.size, flags, index, start, count)


def scsi_cmd_req(cdb: bytes, lun: int = 0, tag: int = 1) -> bytes:
    """virtio_scsi_req_cmd (virtio 1.2 5.6.6.1): single-level LUN of target 0."""
    lun_bytes = bytes((1, 0, 0x40 | lun >> 8, lun & 0xFF, 0, 0, 0, 0))
    return lun_bytes + struct.pack("<QBBB", tag, 0, 0, 0) + cdb.ljust(32, b"\0")


class ServerClosed(Exception):
    pass


def connect_unix(path: str, timeout: float = 10.0) -> socket.socket:
    """A connected socket with ``timeout`` on its operations. The bridge serves one
    client per socket at a time (listen backlog 1): while it still closes the last
    one, connect() says EAGAIN, and we retry until ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.002)


class VfioUserClient:
    """One vfio-user connection, blocking, with a timeout on every receive."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = connect_unix(path, timeout)
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ServerClosed("the server closed the connection")
            out += chunk
        return bytes(out)

    def recv(self) -> tuple[p.Header, bytes]:
        hdr = p.parse_header(self._exact(p.HEADER_SIZE))
        return hdr, self._exact(hdr.size - p.HEADER_SIZE)

    def call(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             flags: int = 0) -> tuple[int, bytes]:
        """One request and its reply: (errno or 0, reply payload)."""
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        self.send_raw(p.encode_message(msg_id, command, payload, flags), fds)
        hdr, body = self.recv()
        if (hdr.msg_id, hdr.command) != (msg_id, command) or not hdr.is_reply:
            raise AssertionError(f"reply {hdr} does not answer {msg_id}/{command}")
        return (hdr.error if hdr.flags & p.FLAG_ERROR else 0), body

    def ok(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        err, body = self.call(command, payload, fds)
        if err:
            raise OSError(err, f"{p.command_name(command)} refused: {os.strerror(err)}")
        return body

    def handshake(self) -> None:
        self.ok(p.Command.VERSION, version_payload())

    def irq_count(self, index: int = MSIX) -> int:
        body = self.ok(p.Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(p.IRQ_INFO.size, 0, index, 0))
        return p.IRQ_INFO.unpack(body)[3]

    # --- the device surface tests/unit/virtio/fakes.Driver drives -------------------

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        body = self.ok(p.Command.REGION_READ, p.REGION_RW.pack(offset, index, count))
        return body[p.REGION_RW.size:]

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.ok(p.Command.REGION_WRITE, p.REGION_RW.pack(offset, index, len(data)) + data)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        try:
            self.ok(p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, index, start, len(fds)),
                    tuple(fds))
        finally:
            for fd in fds:
                os.close(fd)


class MemfdDma(FakeDma):
    """fakes.FakeDma over a memfd the bridge maps too (the guest's RAM)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(size=4096)
        self.fd = fd
        self.mm = mmap.mmap(fd, size)
        self.mem = self.mm  # type: ignore[assignment]
        self._base = memoryview(self.mm)

    def close(self) -> None:
        self._base.release()
        self.mm.close()
        os.close(self.fd)


class VirtioGuest:
    """A virtio-scsi driver over one vfio-user connection, RAM in a memfd at iova 0."""

    def __init__(self, path: str, *, ram_fd: int | None = None, ram_size: int = 4 << 20,
                 timeout: float = 10.0) -> None:
        self.client = VfioUserClient(path, timeout)
        self.client.handshake()
        fd = ram_fd if ram_fd is not None else sealed_memfd(ram_size)
        self.map_error = self.client.call(p.Command.DMA_MAP, dma_map(0, ram_size), (fd,))[0]
        self.dma = MemfdDma(fd, ram_size)
        self.drv = Driver(self.client, self.dma)
        self.drv.init()
        self.req = self.dma.alloc(REQ_LEN)
        self.resp = self.dma.alloc(RESP_LEN)
        self.data = self.dma.alloc(8 * BLOCK, 4096)
        self.tag = 0

    def post(self, cdb: bytes, data_out: bytes = b"", data_in: int = 0, kick: bool = True) -> None:
        self.tag += 1
        self.dma.write(self.req, scsi_cmd_req(cdb, tag=self.tag))
        self.dma.write(self.resp, b"\xee" * RESP_LEN)
        out = [(self.req, REQ_LEN)]
        into = [(self.resp, RESP_LEN)]
        if data_out:
            self.dma.write(self.data, data_out)
            out.append((self.data, len(data_out)))
        if data_in:
            into.append((self.data, data_in))
        self.drv.add_chain(RQ, out, into)
        if kick:
            self.drv.kick(RQ)

    def wait_used(self, timeout: float) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while True:
            used = self.drv.used(RQ)
            if used or time.monotonic() > deadline:
                return used
            time.sleep(0.0005)

    def command(self, cdb: bytes, data_out: bytes = b"", data_in: int = 0,
                timeout: float = 10.0) -> tuple[int, int, bytes]:
        """(virtio response, SCSI status, data in); raises TimeoutError."""
        self.post(cdb, data_out, data_in)
        if not self.wait_used(timeout):
            raise TimeoutError(f"no completion in {timeout} s")
        response, status = self.dma.mem[self.resp + 11], self.dma.mem[self.resp + 10]
        return response, status, self.dma.read(self.data, data_in) if data_in else b""

    def close(self) -> None:
        self.drv.close()
        self.client.close()
        self.dma.close()


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


class GoodGuest:
    """The well-behaved guest: checked I/O in a loop, in a thread, timing every request."""

    def __init__(self, path: str, deadline: float) -> None:
        self.path = path
        self.deadline = deadline
        self.guest = VirtioGuest(path, timeout=deadline)
        self.done: list[float] = []  # completion times (time.monotonic)
        self.errors: list[str] = []
        self.maps = 0  # DMA_MAP + DMA_UNMAP round trips done
        self.map_memory = True  # do those round trips (off while the fd table is full)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-guest", daemon=True)
        self._scratch = sealed_memfd(4096, "good-scratch")
        # Like Linux after a scan: TEST UNIT READY until the power-on unit
        # attention (CHECK CONDITION) is reported and cleared.
        for _ in range(3):
            if self.guest.command(bytes(6), timeout=deadline)[:2] == (0, 0):
                break
        else:
            raise AssertionError("TEST UNIT READY never succeeded")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.guest.close()
        os.close(self._scratch)

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                lba = n % 64 * 8
                pattern = struct.pack("<QQ", n, lba) * (8 * BLOCK // 16)
                resp, status, _ = self.guest.command(write10(lba, 8), data_out=pattern,
                                                     timeout=self.deadline)
                if (resp, status) != (0, 0):
                    self.errors.append(f"WRITE(10) #{n}: response {resp} status {status:#x}")
                resp, status, back = self.guest.command(read10(lba, 8), data_in=8 * BLOCK,
                                                        timeout=self.deadline)
                if (resp, status) != (0, 0) or back != pattern:
                    self.errors.append(f"READ(10) #{n}: response {resp} status {status:#x}, "
                                       f"data {'ok' if back == pattern else 'differs'}")
                if n % 8 == 0 and self.map_memory:  # DMA_MAP/UNMAP served during attacks
                    iova = 1 << 40
                    self.guest.client.ok(p.Command.DMA_MAP, dma_map(iova, 4096),
                                         (self._scratch,))
                    self.guest.client.ok(p.Command.DMA_UNMAP, dma_unmap(iova, 4096))
                    self.maps += 1
                self.done.append(time.monotonic())
                n += 1
                time.sleep(PACE)
        except Exception as exc:  # the assertion happens in the test thread
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def completed_after(self, done: int, more: int, timeout: float = 10) -> int:
        """Wait (up to ``timeout`` s) until ``more`` requests completed beyond ``done``;
        the count completed by then."""
        deadline = time.monotonic() + timeout
        while len(self.done) < done + more and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.done)

    @contextmanager
    def must_progress(self, min_requests: int = 3) -> Iterator[None]:
        """Around an attack: the guest keeps completing I/O, no gap over the deadline."""
        start = time.monotonic()
        first = len(self.done)
        yield
        wait_until = time.monotonic() + 4 * self.deadline
        while len(self.done) < first + min_requests and time.monotonic() < wait_until:
            if self.errors:
                break
            time.sleep(0.01)
        assert not self.errors, f"the good guest failed: {self.errors}"
        times = [start] + self.done[first:]
        assert len(times) > min_requests, (
            f"the good guest completed {len(times) - 1} requests during and after the attack")
        gap = max(b - a for a, b in zip(times, times[1:], strict=False))
        assert gap <= self.deadline, f"the good guest waited {gap:.2f} s for one request"

