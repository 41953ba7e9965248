"""Xenstore wire protocol codec (xen/include/public/io/xs_wire.h), sans-I/O.

A message is ``struct xsd_sockmsg`` {type, req_id, tx_id, len} (four
little-endian uint32 in host order, x86) followed by ``len`` payload bytes,
at most XENSTORE_PAYLOAD_MAX. Strings in payloads are NUL-separated; a value
written with XS_WRITE follows the path's NUL and is not terminated.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

HEADER = struct.Struct("<IIII")
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


# xs_wire.h xsd_errors: the names travel as strings in XS_ERROR payloads.
XSD_ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
              "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")


class XenStoreError(Exception):
    """An XS_ERROR reply; ``errno`` is the name (``"ENOENT"``, ``"EAGAIN"``...)."""

    def __init__(self, errno: str, path: str = "") -> None:
        super().__init__(f"{errno} {path}".strip())
        self.errno = errno
        self.path = path


class XsProtocolError(Exception):
    """The peer sent something that is not a xenstore message."""


@dataclass(frozen=True)
class XsMessage:
    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise ValueError(f"xenstore payload of {len(payload)} bytes exceeds {XENSTORE_PAYLOAD_MAX}")
    return HEADER.pack(type_, req_id & 0xFFFFFFFF, tx_id & 0xFFFFFFFF, len(payload)) + payload


class XsParser:
    """Incremental decoder: feed() bytes, iterate complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[XsMessage]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            type_, req_id, tx_id, length = HEADER.unpack_from(self._buf, 0)
            if length > XENSTORE_PAYLOAD_MAX:
                raise XsProtocolError(f"message length {length} exceeds {XENSTORE_PAYLOAD_MAX}")
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            yield XsMessage(type_, req_id, tx_id, payload)


# ---- request payloads -------------------------------------------------------

def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def path_payload(path: str) -> bytes:
    """READ, DIRECTORY, GET_PERMS, MKDIR, RM: the NUL-terminated path."""
    return _s(path)


def write_payload(path: str, value: bytes | str) -> bytes:
    return _s(path) + (value.encode() if isinstance(value, str) else bytes(value))


def watch_payload(path: str, token: str) -> bytes:
    """WATCH, UNWATCH and WATCH_EVENT: path NUL token NUL."""
    return _s(path) + _s(token)


def transaction_end_payload(commit: bool) -> bytes:
    return b"T\0" if commit else b"F\0"


@dataclass(frozen=True)
class Permission:
    """One entry of a node's permission list: the first names the owner and the default.

    ``perm`` is 'n' (none), 'r' (read), 'w' (write) or 'b' (both).
    """

    domid: int
    perm: str

    def encode(self) -> str:
        return f"{self.perm}{self.domid}"


def set_perms_payload(path: str, perms: Iterable[Permission]) -> bytes:
    return _s(path) + b"".join(_s(p.encode()) for p in perms)


# ---- reply payloads ---------------------------------------------------------

def split_strings(payload: bytes) -> list[str]:
    """NUL-separated strings; a trailing NUL does not add an empty entry."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode(errors="replace") for p in parts]


def parse_perms(payload: bytes) -> list[Permission]:
    out = []
    for item in split_strings(payload):
        domid = item[1:]
        if len(item) < 2 or item[0] not in "nrwb" or not (domid.isascii() and domid.isdigit()):
            raise XsProtocolError(f"bad permission {item!r}")
        out.append(Permission(int(item[1:]), item[0]))
    return out


def parse_watch_event(payload: bytes) -> tuple[str, str]:
    parts = split_strings(payload)
    if len(parts) < 2:
        raise XsProtocolError("watch event without path and token")
    return parts[0], parts[1]


def parse_error(payload: bytes) -> str:
    parts = split_strings(payload)
    return parts[0] if parts else "EINVAL"


def error_payload(errno: str) -> bytes:
    return _s(errno)


OK_PAYLOAD = b"OK\0"
