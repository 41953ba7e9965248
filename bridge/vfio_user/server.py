"""vfio-user server on trio: a unix socket, one client at a time, forever.

Per client: a nursery (the device's tasks live in it and die with the
client), a receive loop that decodes messages and hands each command to a
Session strictly in order, and replies sent with SCM_RIGHTS when they carry
fds. Replies to our own DMA_READ/DMA_WRITE requests are routed to whichever
device task is waiting for them. When the client goes, the device is
detached first (it drops its memoryviews), then the DMA maps are unmapped;
device state stays for the next client (guest reboot, QEMU restart).

Each connection runs on a budget (budget.py): descriptors sent with an
unfinished message beyond what one message may carry close the connection;
DMA maps beyond the budget are refused. accept() errors (EMFILE and the
like) are logged, rate-limited, and retried after a short backoff: a full fd
table must not end the server, let alone the process.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket as stdsocket
from collections.abc import Callable

import trio

from bridge.ratelimit import RateLimitedLog
from bridge.unix_socket import SocketAccess, bind_unix_listener
from bridge.vfio_user import protocol as p
from bridge.vfio_user.budget import ConnectionBudget, connection_budget
from bridge.vfio_user.device import DmaError, VfioUserDevice
from bridge.vfio_user.dma import DmaSpaceImpl
from bridge.vfio_user.session import MAX_MESSAGE_SIZE, ClientLogs, Outgoing, Session

log = logging.getLogger("bridge.vfio_user")

RECV_SIZE = 256 * 1024
# How long a DMA_READ/DMA_WRITE may wait for the client's reply; QEMU's own
# default reply timeout is 5 s (x-msg-timeout).
DMA_REQUEST_TIMEOUT = 5.0
ANCILLARY_SIZE = stdsocket.CMSG_SPACE(p.MAX_MSG_FDS * 4)
# accept(2) errors that say nothing about the listening socket: retried.
ACCEPT_RETRY_ERRNOS = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
    errno.EPROTO, errno.EPERM, errno.EINTR, errno.ETIMEDOUT,
})
ACCEPT_BACKOFF_MIN = 0.05  # seconds; doubles while accept keeps failing
ACCEPT_BACKOFF_MAX = 1.0

# Sockets being served in this process: the fd budget is shared among them.
_sockets_served = 0


def _parse_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


# Called with every decoded message before it is handled (tests, debugging).
TraceFn = Callable[["p.Message | p.OversizedMessage"], None]


class Connection:
    """One connected client: socket I/O, request/reply routing for DMA_READ/WRITE."""

    def __init__(self, sock: trio.socket.SocketType, device: VfioUserDevice,
                 trace: TraceFn | None = None, *, budget: ConnectionBudget | None = None,
                 logs: ClientLogs | None = None) -> None:
        # The connection's own non-blocking socket, waited on with trio.lowlevel: a
        # message already there is read, and a reply sent, without the scheduler pass
        # trio's socket methods take after every call (one per doorbell saved).
        self.sock = stdsocket.socket(fileno=sock.detach())
        self.sock.setblocking(False)
        self.trace = trace
        self.device = device
        self.budget = budget if budget is not None else connection_budget(max(1, _sockets_served))
        self.logs = logs if logs is not None else ClientLogs()
        self.dma = DmaSpaceImpl()
        self.session = Session(device, self.dma, budget=self.budget, logs=self.logs)
        self.close_reason = ""  # why the server ended the connection, if it did
        self.decoder = p.MessageDecoder(MAX_MESSAGE_SIZE)
        self._send_lock = trio.Lock()
        self._next_id = 0
        self._pending: dict[int, tuple[trio.Event, list[p.Message]]] = {}
        self._closed = False
        # One receive buffer for the connection: no 256 KiB allocation per recvmsg.
        self._recv_buf = bytearray(RECV_SIZE)
        self._recv_view = memoryview(self._recv_buf)
        self.dma.set_remote(self._remote_read, self._remote_write, self.dma.max_transfer)

    # --- sending -----------------------------------------------------------------

    async def send(self, out: Outgoing) -> None:
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case: nobody is part-way through a message
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = memoryview(out.data)
            anc = ([(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", out.fds))]
                   if out.fds else [])
            while data:
                try:
                    sent = self.sock.sendmsg([data], anc) if anc else self.sock.send(data)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                data, anc = data[sent:], []  # the fds went with the first byte
        finally:
            lock.release()

    async def _request(self, command: int, payload: bytes) -> p.Message:
        if self._closed:
            raise DmaError("vfio-user client disconnected")
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        event = trio.Event()
        slot: list[p.Message] = []
        self._pending[msg_id] = (event, slot)
        try:
            with trio.move_on_after(DMA_REQUEST_TIMEOUT):
                await self.send(Outgoing(p.encode_message(msg_id, command, payload)))
                await event.wait()
        finally:
            self._pending.pop(msg_id, None)
        if not slot:
            if self._closed:
                raise DmaError("vfio-user client disconnected")
            raise DmaError(f"{p.command_name(command)}: no reply in {DMA_REQUEST_TIMEOUT} s")
        reply = slot[0]
        if reply.header.flags & p.FLAG_ERROR:
            raise DmaError(f"{p.command_name(command)} refused by client: "
                           f"{os.strerror(reply.header.error)}")
        return reply

    async def _remote_read(self, iova: int, count: int) -> bytes:
        reply = await self._request(p.Command.DMA_READ, p.encode_dma_read_request(iova, count))
        try:
            return p.parse_dma_read_reply(reply.payload, count)
        except p.ProtocolError as exc:
            raise DmaError(str(exc)) from None

    async def _remote_write(self, iova: int, data: bytes) -> None:
        await self._request(p.Command.DMA_WRITE, p.encode_dma_write_request(iova, data))

    # --- receiving -----------------------------------------------------------------

    def _route_reply(self, msg: p.Message) -> None:
        for fd in msg.fds:
            os.close(fd)
        waiter = self._pending.get(msg.header.msg_id)
        if waiter is None:
            self.logs.refusals.warning("unexpected reply id %d to %s ignored", msg.header.msg_id,
                                  p.command_name(msg.header.command))
            return
        event, slot = waiter
        slot.append(msg)
        event.set()

    async def run(self) -> None:
        """Receive and handle messages until EOF or an unrecoverable framing error."""
        sock = self.sock
        handled = False  # a batch was handled since this task last let others run
        while True:
            try:
                nbytes, ancdata, flags, _ = sock.recvmsg_into(
                    [self._recv_buf], ANCILLARY_SIZE, stdsocket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                handled = False
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                log.info("client socket error: %s", exc)
                return
            if handled:  # a second batch without waiting: let the other tasks run first
                await trio.lowlevel.checkpoint()
            handled = True
            fds = _parse_fds(ancdata)
            if not nbytes and not fds:
                return
            self.decoder.feed(self._recv_view[:nbytes], fds, bool(flags & stdsocket.MSG_CTRUNC))
            while True:
                event = self.decoder.next_event()
                if event is None:
                    break
                if isinstance(event, p.FramingError):
                    self.close_reason = event.reason
                    return
                if self.trace is not None:
                    self.trace(event)
                if isinstance(event, p.OversizedMessage):
                    out = self.session.handle_oversized(event.header)
                elif event.header.is_reply:
                    self._route_reply(event)
                    continue
                else:
                    out = self.session.handle(event)
                    if self.dma.unsettled:  # a DMA_UNMAP: its reply waits for the device
                        await self.dma.settle()
                if out is not None:
                    try:
                        await self.send(out)
                    except OSError as exc:
                        log.info("client socket error on send: %s", exc)
                        return
            # Complete messages took theirs: what is left came with the
            # unfinished one, which may carry MAX_MSG_FDS at most.
            if (self.decoder.pending_fds > self.budget.fds_in_flight
                    or self.decoder.pending_fd_groups > self.budget.fds_in_flight):
                self.close_reason = (
                    f"{self.decoder.pending_fds} file descriptors in "
                    f"{self.decoder.pending_fd_groups} chunks sent with an unfinished message "
                    f"(at most {self.budget.fds_in_flight} per message)")
                return

    def close(self) -> None:
        """Client gone: fail waiters, detach the device, then drop DMA maps."""
        self._closed = True
        for event, _slot in list(self._pending.values()):
            event.set()
        try:
            self.device.detach()
        except Exception:
            log.exception("device.detach() failed")
        self.dma.set_remote(None, None, self.dma.max_transfer)
        self.dma.unmap_all()
        self.decoder.close()
        try:
            trio.lowlevel.notify_closing(self.sock)
        except RuntimeError:
            pass  # outside a trio run
        self.sock.close()


async def serve(
    socket_path: str,
    device: VfioUserDevice,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    trace: TraceFn | None = None,
    access: SocketAccess | None = None,
) -> None:
    """Serve ``device`` over vfio-user on ``socket_path`` until cancelled.

    Clients are accepted one at a time; each disconnect detaches the device and
    drops its DMA maps, and the next client finds the device state as it was.
    """
    global _sockets_served
    # Refuses a live socket or a non-socket; mode/owner/group from ``access`` (default 0600).
    listener = bind_unix_listener(socket_path, access or SocketAccess())
    _sockets_served += 1
    logs = ClientLogs()  # what this socket's clients make us log, rate-limited
    try:
        log.info("vfio-user server listening on %s", socket_path)
        task_status.started()
        while True:
            sock = await _accept(listener, socket_path)
            budget = connection_budget(_sockets_served)
            await _serve_client(sock, device, trace, budget, logs)
    finally:
        _sockets_served -= 1
        listener.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass


_accept_log = RateLimitedLog(log, burst=5, period=30.0)


async def _accept(listener: trio.socket.SocketType, socket_path: str) -> trio.socket.SocketType:
    """The next client; transient accept(2) failures (a full fd table) are waited out."""
    backoff = ACCEPT_BACKOFF_MIN
    while True:
        try:
            sock, _ = await listener.accept()
            return sock
        except OSError as exc:
            if exc.errno not in ACCEPT_RETRY_ERRNOS:
                raise
            # The pending connection stays queued and the socket stays readable:
            # without a pause this would spin.
            _accept_log.warning("%s: accept failed (%s), retrying in %.2f s", socket_path,
                                os.strerror(exc.errno or 0), backoff)
            await trio.sleep(backoff)
            backoff = min(ACCEPT_BACKOFF_MAX, backoff * 2)


async def _serve_client(sock: trio.socket.SocketType, device: VfioUserDevice,
                        trace: TraceFn | None, budget: ConnectionBudget | None = None,
                        logs: ClientLogs | None = None) -> None:
    conn = Connection(sock, device, trace, budget=budget, logs=logs)
    conn.logs.lifecycle.info("client connected")
    try:
        async with trio.open_nursery() as nursery:
            device.attach(nursery, conn.dma)
            await conn.run()
            nursery.cancel_scope.cancel()
    except Exception:  # a failing device task ends this client, not the server
        conn.logs.closes.exception("client session failed")
    finally:
        conn.close()
        if conn.close_reason:
            conn.logs.closes.warning("client closed by the server: %s (%s)",
                                     conn.close_reason, conn.session.stats_by_name())
        else:
            conn.logs.lifecycle.info("client disconnected (%s)", conn.session.stats_by_name())
