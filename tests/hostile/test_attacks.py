"""Issue 15: one hostile vfio-user client must not disturb the other guests.

Each test runs one attack on ``hostile.sock`` of a real ``vscsi-bridge
serve`` (conftest.py) while the good guest does checked I/O on
``good.sock``. The ``attack`` fixture asserts, around every test: the good
guest completed requests throughout with no wait over GOOD_DEADLINE, and
afterwards the bridge is alive, its fd count and RSS are back near the
baseline, and the hostile socket takes a new client. Each test asserts the
hostile connection alone was closed or its request refused.
"""

from __future__ import annotations

import array
import errno
import os
import resource
import socket
import struct
import tempfile
import time

import pytest

from bridge.vfio_user import protocol as p
from bridge.vfio_user.budget import connection_budget
from tests.hostile.client import (
    EVENTFD_TRIGGER,
    MSIX,
    RQ,
    VfioUserClient,
    VirtioGuest,
    dma_map,
    dma_unmap,
    irq_set,
    read10,
    sealed_memfd,
    version_payload,
)
from tests.hostile.conftest import NOFILE, SOCKETS, Bridge


def closed_by_server(c: VfioUserClient, timeout: float = 5.0) -> bool:
    """True once the server has closed ``c`` (EOF or reset), False if it stays open."""
    c.sock.settimeout(timeout)
    try:
        while True:
            data = c.sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def log_since(bridge: Bridge, start: int) -> str:
    with bridge.log_path.open("rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def wait_log(bridge: Bridge, start: int, text: str, timeout: float = 5.0) -> str:
    """The log since ``start`` once it contains ``text`` (it is written after the close)."""
    deadline = time.monotonic() + timeout
    while text not in (seen := log_since(bridge, start)):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{seen[-3000:]}"
        time.sleep(0.02)
    return seen


# --- 1: file descriptors in flight ---------------------------------------------------


def test_fds_sent_byte_by_byte_with_an_unfinished_message(attack: Bridge) -> None:
    """Each byte of a never-finished message carries 16 fds: closed after the second chunk."""
    log_start = attack.log_size()
    c = attack.hostile()
    ram = sealed_memfd(4096)
    msg = p.encode_message(7, p.Command.DMA_MAP, dma_map(0, 4096))
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ram] * 16))]
    sent_chunks = 0
    peak = 0
    closed = False
    try:
        for i in range(len(msg) - 1):
            c.sock.sendmsg([msg[i : i + 1]], anc)
            sent_chunks += 1
            peak = max(peak, attack.fds())
            if closed_by_server(c, timeout=0.5):
                closed = True
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    c.close()
    os.close(ram)
    assert closed, f"{sent_chunks} chunks of 16 fds sent, the connection is still open"
    assert sent_chunks == 2, f"closed after {sent_chunks} chunks of 16 fds, not the second"
    assert peak <= attack.base_fds + 2 * 16 + 2
    reason = wait_log(attack, log_start, "client closed by the server: 32 file descriptors")
    assert "at most 16 per message" in reason


def test_more_fds_than_a_message_may_carry(attack: Bridge) -> None:
    """253 fds on one message (the kernel's SCM_MAX_FD): 16 arrive, the message is refused."""
    c = attack.hostile()
    ram = sealed_memfd(4096)
    c.send_raw(p.encode_message(9, p.Command.DMA_MAP, dma_map(0, 4096)), [ram] * 253)
    hdr, _ = c.recv()
    assert hdr.flags & p.FLAG_ERROR and hdr.error == errno.EINVAL
    assert c.call(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0))[0] == 0
    c.close()
    os.close(ram)


# --- 2: DMA maps pinning fds ----------------------------------------------------------


def test_dma_maps_stop_at_the_connection_budget(attack: Bridge, good) -> None:
    """Distinct 4 KiB memfds mapped until refused: the budget, not the fd table, is the end."""
    c = attack.hostile()
    irq_vectors = c.irq_count()
    expected = connection_budget(SOCKETS, NOFILE).pinned_fds - irq_vectors
    maps_before = good.maps
    fds: list[int] = []
    accepted = 0
    refusal = 0
    try:
        for i in range(expected + 50):
            fd = sealed_memfd(4096, f"hostile-{i}")
            fds.append(fd)
            err, _ = c.call(p.Command.DMA_MAP, dma_map(i * 4096, 4096), (fd,))
            if err:
                refusal = err
                break
            accepted += 1
        assert accepted == expected and refusal == errno.ENOSPC
        assert attack.fds() <= attack.base_fds + expected + 4
        # while the hostile client holds its whole budget, the good guest maps memory
        deadline = time.monotonic() + 10
        while good.maps < maps_before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert good.maps >= maps_before + 2
        # fd-less maps still work (they pin nothing); unmapping gives a slot back
        assert c.call(p.Command.DMA_MAP, dma_map(1 << 40, 4096))[0] == 0
        assert c.call(p.Command.DMA_UNMAP, dma_unmap(0, 4096))[0] == 0
        assert c.call(p.Command.DMA_MAP, dma_map(0, 4096), (fds[0],))[0] == 0
    finally:
        c.close()
        for fd in fds:
            os.close(fd)


def test_dma_map_bytes_beyond_the_budget(attack: Bridge) -> None:
    """Sparse memfds of 512 GiB mapped until refused: bytes mapped are bounded too."""
    budget = connection_budget(SOCKETS, NOFILE)
    c = attack.hostile()
    size = 512 << 30
    fd = sealed_memfd(size, "hostile-huge")
    try:
        results = [c.call(p.Command.DMA_MAP, dma_map(i * size, size), (fd,))[0]
                   for i in range(budget.mapped_bytes // size + 1)]
        assert results[:-1] == [0] * (budget.mapped_bytes // size)
        assert results[-1] == errno.ENOSPC
    finally:
        c.close()
        os.close(fd)


# --- 3: memory that can shrink under a mapping --------------------------------------


def _unsealed(size: int) -> int:
    fd = os.memfd_create("hostile-unsealed")
    os.ftruncate(fd, size)
    return fd


def _plain_file(size: int) -> int:
    fd, name = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.unlink(name)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("make", [_unsealed, _plain_file], ids=["unsealed memfd", "shm file"])
def test_shrinkable_guest_ram_is_refused_and_shrinking_it_is_harmless(attack: Bridge,
                                                                      make) -> None:
    """The SIGBUS attack: RAM that is not shrink-sealed is never mapped, so shrinking it
    under a device driven into it touches nothing of the bridge."""
    size = 1 << 20
    fd = make(size)
    guest = VirtioGuest(attack.hostile_sock, ram_fd=fd, ram_size=size)
    try:
        assert guest.map_error == errno.EINVAL
        guest.post(read10(0, 1), data_in=512, kick=False)
        # From here this process must not touch the memory either (SIGBUS).
        os.ftruncate(fd, 0)  # pre-fix: the bridge's next ring access was SIGBUS for all
        guest.drv.kick(RQ)
        time.sleep(0.3)
        # the rings are not in any DMA map: the device reports DEVICE_NEEDS_RESET (0x40)
        assert guest.drv.status() & 0x40
    finally:
        guest.client.close()
        guest.drv.close()


def test_sealed_memfd_smaller_than_the_map_is_refused(attack: Bridge) -> None:
    c = attack.hostile()
    fd = sealed_memfd(4096)
    try:
        assert c.call(p.Command.DMA_MAP, dma_map(0, 8192), (fd,))[0] == errno.EINVAL
        assert c.call(p.Command.DMA_MAP, dma_map(0, 4096, offset=4096), (fd,))[0] == errno.EINVAL
        assert c.call(p.Command.DMA_MAP, dma_map(0, 1 << 63), (fd,))[0] == errno.EINVAL
        assert c.call(p.Command.DMA_MAP, dma_map(0, 4096), (fd,))[0] == 0
    finally:
        c.close()
        os.close(fd)


# --- 4: interrupt fds ---------------------------------------------------------------------


def test_irq_fd_that_is_not_an_eventfd_is_refused(attack: Bridge) -> None:
    c = attack.hostile()
    r, w = os.pipe()
    ram = sealed_memfd(4096)
    sock_a, sock_b = socket.socketpair()
    try:
        for fd in (w, ram, sock_a.fileno()):
            err, _ = c.call(p.Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, MSIX, 0, 1), (fd,))
            assert err == errno.EINVAL
    finally:
        c.close()
        for fd in (r, w, ram):
            os.close(fd)
        sock_a.close()
        sock_b.close()


def test_full_blocking_eventfd_does_not_block_the_bridge(attack: Bridge) -> None:
    """An eventfd left blocking with its counter full: a blocking write would hang the
    bridge's only thread at the first completion. The hostile guest's own I/O completes."""
    guest = VirtioGuest(attack.hostile_sock)
    stuck = os.eventfd(0)  # blocking
    try:
        for _ in range(3):  # clear the power-on unit attention
            if guest.command(bytes(6))[:2] == (0, 0):
                break
        os.eventfd_write(stuck, 0xFFFFFFFFFFFFFFFE)  # the counter's maximum
        vector = RQ + 1  # fakes.Driver gives queue q vector q + 1
        guest.client.set_irq_eventfds(MSIX, vector, [os.dup(stuck)])
        assert not os.get_blocking(stuck)  # the bridge made the shared file non-blocking
        for _ in range(3):
            resp, status, _ = guest.command(read10(0, 1), data_in=512, timeout=5)
            assert (resp, status) == (0, 0)
    finally:
        guest.close()
        os.close(stuck)


# --- accept() with the fd table full ------------------------------------------------------


def test_accept_with_the_fd_table_full(attack: Bridge, good) -> None:
    """The bridge's RLIMIT_NOFILE is lowered (prlimit) to the fds it has open: accept()
    fails with EMFILE. The bridge must wait it out, not exit, and take the client later.
    (The good guest's DMA_MAPs pause meanwhile: a DMA_MAP's fd cannot arrive either.)"""
    log_start = attack.log_size()
    good.map_memory = False
    done = len(good.done)
    while len(good.done) < done + 2:  # a round trip begun before the flag is over
        time.sleep(0.01)
    limits = resource.prlimit(attack.proc.pid, resource.RLIMIT_NOFILE)
    try:
        resource.prlimit(attack.proc.pid, resource.RLIMIT_NOFILE,
                         (attack.fds(), limits[1]))
        c = VfioUserClient(attack.hostile_sock)  # queued: the bridge cannot accept it
        wait_log(attack, log_start, "accept failed (Too many open files)", 10)
        time.sleep(0.5)
        assert attack.alive()
    finally:
        resource.prlimit(attack.proc.pid, resource.RLIMIT_NOFILE, limits)
        good.map_memory = True
    c.handshake()  # accepted once fds are free again
    c.close()


# --- 6: log floods -----------------------------------------------------------------------


def test_unknown_commands_flood_is_rate_limited(attack: Bridge) -> None:
    c = attack.hostile()
    log_start = attack.log_size()
    flood = b"".join(p.encode_message(i & 0xFFFF, 99, b"", p.FLAG_NO_REPLY)
                     for i in range(100_000))
    c.sock.sendall(flood)
    assert c.call(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0))[0] == 0
    c.close()
    grown = attack.log_size() - log_start
    assert grown < 20_000, f"100,000 refusals wrote {grown} bytes of log"
    assert "command 99 (id 0): refused with ENOSYS" in log_since(attack, log_start)


def test_unsolicited_replies_flood_is_rate_limited(attack: Bridge) -> None:
    c = attack.hostile()
    log_start = attack.log_size()
    c.sock.sendall(b"".join(p.encode_message(i & 0xFFFF, p.Command.DMA_READ, b"",
                                             p.TYPE_REPLY) for i in range(20_000)))
    assert c.call(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0))[0] == 0
    c.close()
    assert attack.log_size() - log_start < 20_000


def test_reconnect_storm(attack: Bridge) -> None:
    """200 connections: the vfio-user server's own lines per connection are rate-limited.
    (The virtio device and the target log an I_T nexus loss per disconnect, not limited.)"""
    log_start = attack.log_size()
    for _ in range(200):
        c = attack.hostile()
        c.close()
    ours = [line for line in log_since(attack, log_start).splitlines()
            if " bridge.vfio_user:" in line]
    assert len(ours) <= 60, f"{len(ours)} lines for 200 connections"


# --- malformed messages --------------------------------------------------------------------

def _info() -> bytes:
    return p.DEVICE_INFO.pack(16, 0, 0, 0)


# (name, command, payload, fds sent with it, errno); all after VERSION
MALFORMED = [
    ("VERSION twice", p.Command.VERSION, version_payload(), None, errno.EINVAL),
    ("unknown command", 0xFFFF, b"", None, errno.ENOSYS),
    ("DMA_MAP two fds", p.Command.DMA_MAP, dma_map(0, 4096), "memfd2", errno.EINVAL),
    ("DMA_MAP wraps", p.Command.DMA_MAP, dma_map(2**64 - 4096, 8192), None, errno.EINVAL),
    ("DMA_MAP unknown flags", p.Command.DMA_MAP, dma_map(0, 4096, flags=0xFF), None,
     errno.EINVAL),
    ("DMA_UNMAP not mapped", p.Command.DMA_UNMAP, dma_unmap(0x7000, 4096), None, errno.ENOENT),
    ("DMA_UNMAP dirty bitmap", p.Command.DMA_UNMAP, dma_unmap(0, 4096, 1), None, errno.ENOTSUP),
    ("REGION_READ fd attached", p.Command.REGION_READ, p.REGION_RW.pack(0, 7, 4), "memfd",
     errno.EINVAL),
    ("REGION_READ no such region", p.Command.REGION_READ, p.REGION_RW.pack(0, 2**32 - 1, 4),
     None, errno.EINVAL),
    ("REGION_READ past the end", p.Command.REGION_READ, p.REGION_RW.pack(2**64 - 2, 7, 4), None,
     errno.EINVAL),
    ("REGION_READ 4 GiB", p.Command.REGION_READ, p.REGION_RW.pack(0, 4, 2**32 - 1), None,
     errno.E2BIG),
    ("REGION_WRITE count lies", p.Command.REGION_WRITE, p.REGION_RW.pack(0, 7, 100) + b"x",
     None, errno.EINVAL),
    ("SET_IRQS absurd count", p.Command.DEVICE_SET_IRQS,
     irq_set(EVENTFD_TRIGGER, MSIX, 0, 2**32 - 1), None, errno.EINVAL),
    ("SET_IRQS absurd start", p.Command.DEVICE_SET_IRQS,
     irq_set(EVENTFD_TRIGGER, MSIX, 2**32 - 1, 1), None, errno.EINVAL),
    ("SET_IRQS absurd index", p.Command.DEVICE_SET_IRQS,
     irq_set(EVENTFD_TRIGGER, 2**32 - 1, 0, 1), None, errno.EINVAL),
    ("SET_IRQS fd count mismatch", p.Command.DEVICE_SET_IRQS,
     irq_set(EVENTFD_TRIGGER, MSIX, 0, 3), "eventfd", errno.EINVAL),
    ("GET_REGION_INFO short", p.Command.DEVICE_GET_REGION_INFO, b"\x20", None, errno.EINVAL),
    ("WRITE_MULTI too many", p.Command.REGION_WRITE_MULTI, struct.pack("=Q", 2**63), None,
     errno.EINVAL),
]


def _fds_for(kind: str | None) -> list[int]:
    if kind is None:
        return []
    if kind == "eventfd":
        return [os.eventfd(0)]
    fd = sealed_memfd(4096)
    return [fd, os.dup(fd)] if kind == "memfd2" else [fd]


@pytest.mark.parametrize(("name", "command", "payload", "fds", "err"), MALFORMED,
                         ids=[c[0] for c in MALFORMED])
def test_malformed_message_is_refused_and_the_connection_goes_on(
        attack: Bridge, name: str, command: int, payload: bytes, fds: str | None,
        err: int) -> None:
    c = attack.hostile()
    sent = _fds_for(fds)
    try:
        assert c.call(command, payload, tuple(sent))[0] == err, name
        assert c.call(p.Command.DEVICE_GET_INFO, _info())[0] == 0  # the connection goes on
    finally:
        c.close()
        for fd in sent:
            os.close(fd)


def test_commands_before_version_are_refused(attack: Bridge) -> None:
    c = attack.hostile(handshake=False)
    try:
        assert c.call(p.Command.DEVICE_GET_INFO, _info())[0] == errno.EINVAL
        assert c.call(p.Command.VERSION, b"\0\0\0\0{not json\0")[0] == errno.EINVAL
        c.handshake()
        assert c.call(p.Command.DEVICE_GET_INFO, _info())[0] == 0
    finally:
        c.close()


def test_overlapping_dma_map(attack: Bridge) -> None:
    c = attack.hostile()
    fd = sealed_memfd(1 << 16)
    try:
        assert c.call(p.Command.DMA_MAP, dma_map(0x10000, 0x8000), (fd,))[0] == 0
        for iova, size in [(0x10000, 0x8000), (0xF000, 0x2000), (0x17000, 0x2000),
                           (0x8000, 0x10000)]:
            assert c.call(p.Command.DMA_MAP, dma_map(iova, size), (fd,))[0] == errno.EEXIST
        assert c.call(p.Command.DMA_UNMAP, dma_unmap(0x12000, 0x1000))[0] == errno.EINVAL
        assert c.call(p.Command.DMA_UNMAP, dma_unmap(0, 0, p.DMA_UNMAP_FLAG_ALL))[0] == 0
    finally:
        c.close()
        os.close(fd)


def test_header_smaller_than_a_header_closes_the_connection(attack: Bridge) -> None:
    c = attack.hostile()
    log_start = attack.log_size()
    c.send_raw(p.HEADER.pack(1, p.Command.DEVICE_GET_INFO, 8, 0, 0))
    assert closed_by_server(c)
    c.close()
    wait_log(attack, log_start, "client closed by the server: message size 8 smaller")


def test_truncated_header_then_gone(attack: Bridge) -> None:
    for cut in (1, 8, 15):
        c = attack.hostile()
        c.send_raw(p.encode_message(1, p.Command.DEVICE_GET_INFO, _info())[:cut])
        c.close()


def test_huge_message_size_is_refused_and_its_body_skipped(attack: Bridge) -> None:
    c = attack.hostile()
    c.send_raw(p.HEADER.pack(3, p.Command.REGION_WRITE, 2**32 - 1, 0, 0) + b"\xaa" * 4096)
    hdr, _ = c.recv()
    assert (hdr.msg_id, hdr.flags & p.FLAG_ERROR, hdr.error) == (3, p.FLAG_ERROR, errno.E2BIG)
    c.close()


def test_half_sent_large_message_held_open(attack: Bridge, good) -> None:
    """Slow loris: 1 MiB of a REGION_WRITE, then nothing; the bytes held are bounded."""
    c = attack.hostile()
    body = p.REGION_RW.pack(0, 4, 1 << 20) + bytes(1 << 20)
    msg = p.encode_message(5, p.Command.REGION_WRITE, body)
    c.sock.sendall(msg[:-1])
    done = len(good.done)
    assert good.completed_after(done, 20) >= done + 20
    assert attack.rss_kib() <= attack.base_rss_kib + 8 * 1024
    c.close()


def test_client_that_never_reads_its_replies(attack: Bridge, good) -> None:
    """REGION_READs sent until our socket is full, replies never read: only this
    connection waits on its send; the bridge reads no more from it meanwhile."""
    c = attack.hostile()
    c.sock.setblocking(False)
    req = p.encode_message(1, p.Command.REGION_READ, p.REGION_RW.pack(0, 7, 256))
    batch = req * 256
    sent = 0
    try:
        while sent < 64 << 20:
            sent += c.sock.send(batch)
    except BlockingIOError:
        pass
    assert sent < 64 << 20, "the bridge kept reading without being able to reply"
    done = len(good.done)
    assert good.completed_after(done, 10) >= done + 10
    assert attack.rss_kib() <= attack.base_rss_kib + 16 * 1024
    c.close()


def test_garbage_on_the_socket(attack: Bridge) -> None:
    c = attack.hostile(handshake=False)
    c.sock.sendall(os.urandom(1 << 16))
    c.close()


def test_guest_vanishing_mid_io_leaves_nothing_behind(attack: Bridge) -> None:
    """Interrupts set up, a READ in flight, then gone: its fds and maps are all released."""
    guest = VirtioGuest(attack.hostile_sock)
    guest.post(read10(0, 8), data_in=4096)
    guest.close()
