"""The per-connection budget: its numbers, DMA maps against it, fds vetted, fds in flight."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket as stdsocket
import tempfile
from pathlib import Path

import pytest
import trio

from bridge.vfio_user import protocol as p
from bridge.vfio_user import server as server_mod
from bridge.vfio_user.budget import (
    FDS_IN_FLIGHT,
    MAX_DMA_MAPS,
    MAX_MAPPED_BYTES,
    MAX_PINNED_FDS,
    MIN_PINNED_FDS,
    connection_budget,
)
from bridge.vfio_user.dma import DmaMapError, DmaSpaceImpl
from bridge.vfio_user.fds import check_eventfd, check_sealed_memory

from .test_server import DummyDevice, connect, memfd, running, tmp_path  # noqa: F401


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(("nofile", "sockets", "pinned"), [
    (1024, 1, 224),  # reserve 128, shared by at least 4 connections
    (1024, 2, 224),
    (1024, 8, 112),  # more sockets than MIN_SHARES: split among them
    (20000, 2, MAX_PINNED_FDS),  # 4375, capped
    (100, 2, MIN_PINNED_FDS),  # a tiny limit still lets one guest map its RAM
])
def test_budget_numbers(nofile: int, sockets: int, pinned: int) -> None:
    b = connection_budget(sockets, nofile)
    assert b.pinned_fds == pinned
    assert (b.fds_in_flight, b.dma_maps, b.mapped_bytes) == (
        FDS_IN_FLIGHT, MAX_DMA_MAPS, MAX_MAPPED_BYTES)
    assert FDS_IN_FLIGHT == p.MAX_MSG_FDS


def test_fd_maps_and_bytes_are_budgeted_until_really_unmapped() -> None:
    ram = memfd(1 << 20)
    dma = DmaSpaceImpl(max_fd_maps=3, max_mapped_bytes=0x3000)
    try:
        for i in range(3):
            dma.map(i * 0x1000, 0x1000, True, True, ram, i * 0x1000)
        assert (dma.fd_maps, dma.mapped_bytes) == (3, 0x3000)
        with pytest.raises(DmaMapError) as exc:
            dma.map(0x10000, 0x1000, True, True, ram, 0)
        assert exc.value.errno == errno.ENOSPC
        dma.map(0x20000, 0x1000, True, True, None, 0)  # no fd: costs no fd
        view = dma.view(0, 16, True)  # the device still uses the first map
        dma.unmap(0, 0x1000)
        assert dma.deferred_unmaps == 1 and dma.fd_maps == 3  # its fd is still open
        with pytest.raises(DmaMapError):
            dma.map(0x10000, 0x1000, True, True, ram, 0)
        view.release()
        dma.unmap(0x1000, 0x1000)  # retries the deferred one too
        assert (dma.fd_maps, dma.mapped_bytes, dma.deferred_unmaps) == (1, 0x1000, 0)
        dma.map(0x10000, 0x1000, True, True, ram, 0)
        with pytest.raises(DmaMapError) as exc:  # bytes: 0x2000 mapped, 0x2000 more is over
            dma.map(0x30000, 0x2000, True, True, ram, 0)
        assert exc.value.errno == errno.ENOSPC and "bytes" in str(exc.value)
    finally:
        dma.unmap_all()
        os.close(ram)
    assert (dma.fd_maps, dma.mapped_bytes) == (0, 0)


def _unsealed() -> int:
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, 0x2000)
    return fd


def _plain_file() -> int:
    fd, name = tempfile.mkstemp()
    os.unlink(name)
    os.ftruncate(fd, 0x2000)
    return fd


def _pipe_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.mark.parametrize("make", [_unsealed, _plain_file, _pipe_end, lambda: os.eventfd(0)],
                         ids=["unsealed memfd", "plain file", "pipe", "eventfd"])
def test_dma_memory_must_be_a_shrink_sealed_memfd(make) -> None:
    fd = make()
    try:
        with pytest.raises(p.ProtocolError) as exc:
            check_sealed_memory(fd, 0, 0x1000)
        assert exc.value.errno == errno.EINVAL and "F_SEAL_SHRINK" in exc.value.reason
    finally:
        os.close(fd)


def test_sealed_memfd_is_accepted_within_its_size_only() -> None:
    fd = memfd(0x2000)
    try:
        check_sealed_memory(fd, 0x1000, 0x1000)
        with pytest.raises(OSError):  # the seal is what makes the mapping safe
            os.ftruncate(fd, 0x1000)
        with pytest.raises(p.ProtocolError, match="past the end"):
            check_sealed_memory(fd, 0x1000, 0x1001)
    finally:
        os.close(fd)
    empty = os.memfd_create("empty", os.MFD_ALLOW_SEALING)
    fcntl.fcntl(empty, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        with pytest.raises(p.ProtocolError, match="past the end"):
            check_sealed_memory(empty, 0, 0x1000)
    finally:
        os.close(empty)


def test_irq_fd_must_be_an_eventfd_and_becomes_non_blocking() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(p.ProtocolError, match="not an eventfd") as exc:
            check_eventfd(w)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    efd = os.eventfd(0)  # blocking, as a careless client would make it
    dup = os.dup(efd)  # what the server receives: the same open file
    try:
        assert os.get_blocking(efd)
        check_eventfd(dup)
        assert not os.get_blocking(efd)
        os.eventfd_write(dup, 0xFFFFFFFFFFFFFFFE)  # the counter is full now
        with pytest.raises(BlockingIOError):  # a blocking write would hang the bridge
            os.eventfd_write(dup, 1)
    finally:
        os.close(efd)
        os.close(dup)


async def test_fds_piling_up_on_an_unfinished_message_close_the_connection(
        tmp_path: Path) -> None:  # noqa: F811
    dev = DummyDevice()
    ram = memfd(0x1000)
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        await c.handshake()
        before = open_fds()
        msg = p.encode_message(1, p.Command.DMA_MAP, b"\0" * 32)
        anc = [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", [ram] * 16))]
        closed = False
        with trio.fail_after(10):
            for i in range(len(msg) - 1):  # one byte per chunk, 16 fds with each
                try:
                    await c.sock.sendmsg([msg[i : i + 1]], anc)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                await trio.sleep(0.01)
            if not closed:
                assert await c.sock.recv(16) == b""  # EOF: the server closed us
        assert i <= 3, f"the server let {i + 1} chunks of 16 fds pile up"
        # every received fd was closed again; the server serves the next client
        while open_fds() > before:
            await trio.sleep(0.01)
        c.sock.close()
        c2 = await connect(path)
        await c2.handshake()
    os.close(ram)


async def test_accept_errors_are_survived(tmp_path: Path, monkeypatch,  # noqa: F811
                                          caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE on accept() (another guest took the fd table) must not end serve()."""
    failures = [errno.EMFILE, errno.ENFILE, errno.ECONNABORTED]
    real_bind = server_mod.bind_unix_listener

    class Listener:
        def __init__(self, sock: object) -> None:
            self._sock = sock

        def __getattr__(self, name: str) -> object:
            return getattr(self._sock, name)

        async def accept(self):
            if failures:
                await trio.lowlevel.checkpoint()
                err = failures.pop(0)
                raise OSError(err, os.strerror(err))
            return await self._sock.accept()

    monkeypatch.setattr(server_mod, "bind_unix_listener",
                        lambda *args, **kwargs: Listener(real_bind(*args, **kwargs)))
    dev = DummyDevice()
    async with running(tmp_path, dev) as path:
        c = await connect(path)
        with trio.fail_after(10):
            caps = await c.handshake()
        assert caps["max_msg_fds"] == 16 and not failures
    assert any("accept failed (Too many open files)" in r.getMessage() for r in caplog.records)
