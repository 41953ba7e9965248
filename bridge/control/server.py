"""The control socket: JSON-RPC 2.0 over a unix stream socket, one request per line.

Default path ``<state_dir>/control.sock``, mode 0600 (owner, group and mode are
parameters). The socket is bound under a temporary name, given its mode and owner,
then renamed into place, so it is never reachable with looser permissions.

Bounds: a request line longer than ``max_request`` bytes gets an error line and the
connection is closed; beyond ``max_clients`` connections a new one gets an error line
and is closed; a client that never reads its answers blocks only its own connection.
Malformed JSON, unknown methods and wrong parameter types get JSON-RPC errors; the
bridge keeps serving everyone else.
"""

from __future__ import annotations

import logging
import os
import stat
from functools import partial
from typing import Any

import trio

from bridge.scsi.target import Target
from bridge.unix_socket import SocketAccess, bind_unix_listener

from . import methods
from .host import AttachmentHost
from .jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    TOO_MANY_CLIENTS,
    RpcError,
    encode_error,
    encode_result,
    error_id,
    parse_request,
)
from .uevents import BlockDeviceWatcher

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20
MAX_CLIENTS = 64
_RECV = 65536


def default_socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class ControlServer:
    """Accepts control clients and answers their requests from the method table."""

    def __init__(self, control: methods.Control, *, max_request: int = MAX_REQUEST,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.control = control
        self.max_request = max_request
        self.max_clients = max_clients
        self.clients = 0
        self.refused = 0

    async def serve(self, path: str, *, mode: int = 0o600, owner: int | None = None,
                    group: int | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Never takes over a live socket or replaces a non-socket; bound under a umask
        # that keeps it unreachable until its mode and owner are set.
        listener = bind_unix_listener(path, SocketAccess(mode, owner, group), backlog=128)
        self.control.socket_path = path
        try:
            log.info("control socket %s (mode %04o)", path, mode)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as e:  # EMFILE and friends: wait, do not spin or die
                        log.warning("control socket accept: %s", e)
                        await trio.sleep(0.1)
                        continue
                    stream = trio.SocketStream(sock)
                    if self.clients >= self.max_clients:
                        self.refused += 1
                        nursery.start_soon(self._refuse, stream)
                        continue
                    self.clients += 1
                    nursery.start_soon(self._client, stream)
        finally:
            listener.close()
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass

    async def _refuse(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(1):
            try:
                await stream.send_all(encode_error(
                    None, TOO_MANY_CLIENTS, f"too many control clients (at most {self.max_clients})"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await stream.aclose()

    async def _client(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > self.max_request:
                        await stream.send_all(encode_error(
                            None, INVALID_REQUEST,
                            f"request longer than {self.max_request} bytes; closing the connection"))
                        return
                    data = await stream.receive_some(_RECV)
                    if not data:
                        return  # a partial last line without newline is dropped
                    buf += data
                    continue
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if len(line) > self.max_request:
                    await stream.send_all(encode_error(
                        None, INVALID_REQUEST,
                        f"request longer than {self.max_request} bytes; closing the connection"))
                    return
                if not line.strip():
                    continue
                answer = await self.answer(line)
                if answer is not None:
                    await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except OSError as e:
            log.info("control client: %s", e)
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)

    async def answer(self, line: bytes) -> bytes | None:
        """One request line -> one response line (None for a notification)."""
        try:
            req = parse_request(line)
        except RpcError as e:
            return encode_error(error_id(e), e.code, e.message)
        try:
            result = await methods.call(self.control, req.method, req.params)
        except RpcError as e:
            return None if req.notification else encode_error(req.id, e.code, e.message)
        except Exception as e:
            log.exception("control method %s failed", req.method)
            return None if req.notification else encode_error(
                req.id, INTERNAL_ERROR, f"internal error in {req.method}: {type(e).__name__}: {e}")
        if req.notification:
            return None
        try:
            return encode_result(req.id, result)
        except (TypeError, ValueError) as e:
            log.exception("control method %s returned a value JSON cannot hold", req.method)
            return encode_error(req.id, INTERNAL_ERROR, f"internal error in {req.method}: {e}")


async def serve_control(target: Target, host: AttachmentHost, *, state_dir: str,
                        log_level: str = "info", config_path: str | None = None,
                        socket_path: str | None = None, mode: int = 0o600,
                        owner: int | None = None, group: int | None = None,
                        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """The serve hook: run the control server (and the block-device uevent watcher) until
    cancelled (``nursery.start`` it)."""
    control = methods.Control(target, host, state_dir, log_level, config_path)
    control.watcher = BlockDeviceWatcher(target)
    server = ControlServer(control)
    path = socket_path or default_socket_path(state_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.watcher.run)
            await nursery.start(partial(server.serve, path, mode=mode, owner=owner, group=group))
            task_status.started()
    finally:
        control.faults.clear()  # fault rules never outlive the control plane that set them
