"""Python clients of the control socket: the API for users' own tests and tools.

Two clients with the same methods: ``ControlClient`` (trio) and
``BlockingControlClient`` (plain sockets, for scripts and synchronous tests). Each
control method is a Python method of the same name with dots as underscores
(``lu.add`` -> ``client.lu_add(name=..., path=..., size="1GiB")``), taking the
method's parameters as keyword arguments; ``call(method, **params)`` does the same
by name. A JSON-RPC error raises ``ControlError`` (``code``, ``message``)::

    from bridge.control.client import BlockingControlClient

    with BlockingControlClient("/run/vscsi-bridge/control.sock") as bridge:
        bridge.lu_add(name="scratch", path="/var/tmp/scratch.img", size="1GiB")
        bridge.lun_map(initiator="iqn.2026-11.org.example:vm1", lun=1, lu="scratch")
        print(bridge.stats()["logical_units"]["scratch"]["commands"])

    async with await ControlClient.connect(path) as bridge:   # trio
        await bridge.lu_resize(name="scratch", size="2GiB")
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .jsonrpc import ERROR_NAMES, REFUSED, encode_request

DEFAULT_SOCKET = "/run/vscsi-bridge/control.sock"
MAX_RESPONSE = 64 << 20


class ControlError(Exception):
    """The bridge answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, method: str = "") -> None:
        super().__init__(f"{message} ({ERROR_NAMES.get(code, 'error')} {code})")
        self.code = code
        self.message = message
        self.method = method

    @property
    def refused(self) -> bool:
        """A refused operation (the CLI's exit 1) rather than a malformed request."""
        return self.code >= REFUSED - 99 and self.code <= REFUSED


def method_name(attribute: str) -> str:
    """``lu_add`` -> ``lu.add``: the first underscore is the dot (``stats_reset``,
    ``rpc_list``, ``log_level``); ``status`` and ``stats`` have none."""
    group, sep, rest = attribute.partition("_")
    return f"{group}.{rest}" if sep else group


def _result(raw: bytes, method: str) -> Any:
    answer = json.loads(raw)
    if "error" in answer:
        err = answer["error"]
        raise ControlError(err.get("code", 0), err.get("message", ""), method)
    return answer.get("result")


class _Lines:
    """The responses on a control connection, one per line (sans-I/O: both clients
    feed it what they receive)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        if not data:
            raise ConnectionError("the bridge closed the control connection")
        self._buf += data

    def pop(self, method: str) -> bytes | None:
        """The next whole line, or None until more is fed."""
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_RESPONSE:
                raise ControlError(0, "response too long", method)
            return None
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        return line


class ControlClient:
    """A trio client; one request at a time per client (``call`` is serialised)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._lines = _Lines()
        self._ids = itertools.count(1)
        self._lock = trio.Lock()

    @classmethod
    async def connect(cls, path: str = DEFAULT_SOCKET) -> ControlClient:
        return cls(await trio.open_unix_socket(path))

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def call(self, method: str, **params: Any) -> Any:
        async with self._lock:
            await self._stream.send_all(encode_request(method, params, next(self._ids)))
            while (line := self._lines.pop(method)) is None:
                self._lines.feed(await self._stream.receive_some(65536))
        return _result(line, method)

    def __getattr__(self, attribute: str) -> Callable[..., Awaitable[Any]]:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        name = method_name(attribute)

        async def method(**params: Any) -> Any:
            return await self.call(name, **params)
        method.__name__ = attribute
        return method


class BlockingControlClient:
    """The same methods over a plain blocking socket (``timeout`` seconds per call)."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except BaseException:
            self._sock.close()
            raise
        self._lines = _Lines()
        self._ids = itertools.count(1)

    def __enter__(self) -> BlockingControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, method: str, **params: Any) -> Any:
        self._sock.sendall(encode_request(method, params, next(self._ids)))
        while (line := self._lines.pop(method)) is None:
            self._lines.feed(self._sock.recv(65536))
        return _result(line, method)

    def __getattr__(self, attribute: str) -> Callable[..., Any]:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        name = method_name(attribute)

        def method(**params: Any) -> Any:
            return self.call(name, **params)
        method.__name__ = attribute
        return method
