"""A trio xenstore client over any byte stream (xenstored socket, /dev/xen/xenbus, sim).

Requests are pipelined and matched to replies by req_id; a reader task also
routes XS_WATCH_EVENTs to ``Watch`` objects. A watch coalesces the paths that
fired into a set (the backend is level-triggered: it re-reads state on each
wake-up), so a guest that writes its nodes in a loop costs memory bounded by
the number of distinct paths, never a growing queue.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from bridge.xen import xs_wire
from bridge.xen.xs_wire import Permission, XenStoreError, XsType

log = logging.getLogger(__name__)
T = TypeVar("T")

XENSTORED_SOCKET = "/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"


class Watch:
    """Paths that changed under a watched path since the last ``wait()``."""

    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self.token = token
        self._pending: set[str] = set()
        self._event = trio.Event()

    def _fire(self, path: str) -> None:
        self._pending.add(path)
        self._event.set()

    def poke(self, reason: str) -> None:
        """Wake the waiter without a xenstore event (e.g. a target event)."""
        self._fire(reason)

    async def wait(self) -> set[str]:
        while not self._pending:
            await self._event.wait()
            self._event = trio.Event()
        fired, self._pending = self._pending, set()
        return fired


class XenStore:
    """Client; obtain one with ``open_xenstore`` so its reader task has a nursery."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[xs_wire.XsMessage]]] = {}
        self._watches: dict[str, Watch] = {}
        self._send_lock = trio.Lock()
        self._closed: BaseException | None = None
        self._tokens = itertools.count(1)

    # ---- transport ----------------------------------------------------------
    async def _reader(self) -> None:
        parser = xs_wire.XsParser()
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise ConnectionError("xenstore connection closed")
                for msg in parser.feed(data):
                    self._dispatch(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError,
                xs_wire.XsProtocolError) as exc:
            self._closed = exc
        finally:
            # Also when cancelled: nobody will read replies any more, so wake every waiter.
            if self._closed is None:
                self._closed = ConnectionError("xenstore reader stopped")
            for event, _ in self._waiting.values():
                event.set()

    def _dispatch(self, msg: xs_wire.XsMessage) -> None:
        if msg.type == XsType.WATCH_EVENT:
            try:
                path, token = xs_wire.parse_watch_event(msg.payload)
            except xs_wire.XsProtocolError:
                log.warning("malformed xenstore watch event ignored")
                return
            watch = self._watches.get(token)
            if watch is not None:
                watch._fire(path)
            return
        slot = self._waiting.pop(msg.req_id, None)
        if slot is None:
            log.warning("xenstore reply for unknown req_id %d ignored", msg.req_id)
            return
        slot[1].append(msg)
        slot[0].set()

    async def request(self, type_: XsType, payload: bytes, tx_id: int = 0, path: str = "") -> bytes:
        if self._closed is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            raise ConnectionError(f"xenstore connection lost: {self._closed}")
        req_id = next(self._ids) & 0xFFFFFFFF
        event = trio.Event()
        box: list[xs_wire.XsMessage] = []
        self._waiting[req_id] = (event, box)
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(xs_wire.encode(type_, req_id, tx_id, payload))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectionError(f"xenstore connection lost: {exc!r}") from exc
            await event.wait()
        finally:
            self._waiting.pop(req_id, None)
        if not box:
            # Woken because the reader stopped; if that is our own cancellation, say so.
            await trio.lowlevel.checkpoint_if_cancelled()
            raise ConnectionError(f"xenstore connection lost: {self._closed}")
        reply = box[0]
        if reply.type == XsType.ERROR:
            raise XenStoreError(xs_wire.parse_error(reply.payload), path)
        return reply.payload

    # ---- operations ---------------------------------------------------------
    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.request(XsType.READ, xs_wire.path_payload(path), tx, path)

    async def read_str(self, path: str, default: str | None = None, tx: int = 0) -> str | None:
        """Read as text; ``default`` when the node does not exist."""
        try:
            return (await self.read(path, tx)).decode(errors="replace")
        except XenStoreError as exc:
            if exc.errno == "ENOENT":
                return default
            raise

    async def read_int(self, path: str, default: int | None = None, tx: int = 0) -> int | None:
        text = await self.read_str(path, None, tx)
        if text is None:
            return default
        try:
            return int(text.strip().rstrip("\0"))
        except ValueError:
            return default

    async def write(self, path: str, value: bytes | str | int, tx: int = 0) -> None:
        if isinstance(value, int):
            value = str(value)
        await self.request(XsType.WRITE, xs_wire.write_payload(path, value), tx, path)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self.request(XsType.MKDIR, xs_wire.path_payload(path), tx, path)

    async def rm(self, path: str, tx: int = 0, missing_ok: bool = True) -> None:
        try:
            await self.request(XsType.RM, xs_wire.path_payload(path), tx, path)
        except XenStoreError as exc:
            if not (missing_ok and exc.errno == "ENOENT"):
                raise

    async def directory(self, path: str, tx: int = 0, missing_ok: bool = False) -> list[str]:
        try:
            return xs_wire.split_strings(
                await self.request(XsType.DIRECTORY, xs_wire.path_payload(path), tx, path))
        except XenStoreError as exc:
            if missing_ok and exc.errno == "ENOENT":
                return []
            raise

    async def exists(self, path: str, tx: int = 0) -> bool:
        try:
            await self.read(path, tx)
            return True
        except XenStoreError as exc:
            if exc.errno == "ENOENT":
                return False
            raise

    async def get_perms(self, path: str, tx: int = 0) -> list[Permission]:
        return xs_wire.parse_perms(
            await self.request(XsType.GET_PERMS, xs_wire.path_payload(path), tx, path))

    async def set_perms(self, path: str, perms: Iterable[Permission], tx: int = 0) -> None:
        await self.request(XsType.SET_PERMS, xs_wire.set_perms_payload(path, perms), tx, path)

    # ---- transactions -------------------------------------------------------
    async def transaction_start(self) -> int:
        reply = await self.request(XsType.TRANSACTION_START, b"\0")
        return int(xs_wire.split_strings(reply)[0])

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.request(XsType.TRANSACTION_END, xs_wire.transaction_end_payload(commit), tx)

    async def transact(self, body: Callable[[int], Awaitable[T]], attempts: int = 32) -> T:
        """Run ``body(tx)`` in a transaction, retrying it while the commit answers EAGAIN."""
        for _ in range(attempts):
            tx = await self.transaction_start()
            try:
                result = await body(tx)
            except BaseException:
                with trio.CancelScope(shield=True):
                    try:
                        await self.transaction_end(tx, commit=False)
                    except (XenStoreError, ConnectionError):
                        pass
                raise
            try:
                await self.transaction_end(tx, commit=True)
                return result
            except XenStoreError as exc:
                if exc.errno != "EAGAIN":
                    raise
            await trio.sleep(0)
        raise XenStoreError("EAGAIN", f"transaction gave up after {attempts} attempts")

    # ---- watches ------------------------------------------------------------
    @asynccontextmanager
    async def watch(self, *paths: str) -> AsyncIterator[Watch]:
        """Watch one or more paths with one ``Watch`` (xenstored fires each once at once)."""
        w = Watch(paths[0] if paths else "", "")
        registered: list[tuple[str, str]] = []
        try:
            for path in paths:
                token = f"vscsi-bridge-{os.getpid()}-{next(self._tokens)}"
                self._watches[token] = w
                await self.request(XsType.WATCH, xs_wire.watch_payload(path, token), 0, path)
                registered.append((path, token))
            yield w
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for path, token in registered:
                    try:
                        await self.request(XsType.UNWATCH, xs_wire.watch_payload(path, token),
                                           0, path)
                    except (XenStoreError, ConnectionError):
                        pass
            for token in [t for t, v in self._watches.items() if v is w]:
                del self._watches[token]


@asynccontextmanager
async def open_xenstore(stream: trio.abc.Stream) -> AsyncIterator[XenStore]:
    """A client over ``stream``, closed (with its reader) on exit."""
    xs = XenStore(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(xs._reader)
        try:
            yield xs
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def connect_xenstored(path: str | None = None) -> trio.abc.Stream:
    """The real xenstore: xenstored's unix socket, else the /dev/xen/xenbus device."""
    sock = path or XENSTORED_SOCKET
    if path is not None or os.path.exists(sock):
        return await trio.open_unix_socket(sock)
    fd = os.open(XENBUS_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    return trio.lowlevel.FdStream(fd)


@asynccontextmanager
async def open_dom0_xenstore(path: str | None = None) -> AsyncIterator[XenStore]:
    """A client on the real xenstore (``path``: a xenstored socket); the one way the
    bridge, its CLI and the dom0 scripts open it."""
    async with open_xenstore(await connect_xenstored(path)) as xs:
        yield xs
