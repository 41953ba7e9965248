"""An in-process xenstored speaking the real wire protocol over socketpairs.

Enough of xenstored's semantics for the backend and toolstack to be tested
with the same client code as in a dom0: a tree of nodes with values and
permission lists (checked for non-zero domains, inherited on creation, owner
= creating domain), watches (fired at registration, on changes at or below
the watched path, and on removal of an ancestor), the special
@introduceDomain/@releaseDomain watches, and transactions that fail with
EAGAIN when anything else committed meanwhile.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import trio

from bridge.xen import xs_wire
from bridge.xen.xs_wire import Permission, XsType

log = logging.getLogger(__name__)


@dataclass
class _Node:
    value: bytes
    perms: list[Permission]


@dataclass
class _Conn:
    domid: int
    stream: trio.SocketStream
    watches: set[tuple[str, str]] = field(default_factory=set)
    send_lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class _Tx:
    generation: int
    tree: dict[str, _Node]


class _Err(Exception):
    def __init__(self, errno: str) -> None:
        self.errno = errno


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _is_under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


class SimXenstored:
    """Run with ``nursery.start_soon``-free API: ``connect()`` spawns a server task per connection."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.tree: dict[str, _Node] = {"/": _Node(b"", [Permission(0, "n")])}
        self.generation = 0
        self._conns: list[_Conn] = []
        self._tx: dict[int, _Tx] = {}
        self._tx_ids = itertools.count(1)
        self.ops: dict[str, int] = {}
        for p in ("/local", "/local/domain", "/local/domain/0"):
            self.tree[p] = _Node(b"", [Permission(0, "n")])

    # ---- test helpers -------------------------------------------------------
    async def connect(self, domid: int = 0) -> trio.SocketStream:
        a, b = trio.socket.socketpair()
        conn = _Conn(domid, trio.SocketStream(b))
        self._conns.append(conn)
        self._nursery.start_soon(self._serve, conn)
        return trio.SocketStream(a)

    def introduce_domain(self, domid: int, name: str) -> None:
        """What the toolstack and xenstored do at domain creation."""
        base = f"/local/domain/{domid}"
        perms = [Permission(domid, "n"), Permission(0, "r")] if domid else [Permission(0, "n")]
        self.tree[base] = _Node(b"", perms)
        self.tree[base + "/name"] = _Node(name.encode(), list(perms))
        self.tree[base + "/domid"] = _Node(str(domid).encode(), list(perms))
        self.tree[base + "/device"] = _Node(b"", list(perms))
        self.generation += 1
        self._fire_special("@introduceDomain")

    def release_domain(self, domid: int) -> None:
        """What `xl destroy` leaves: the domain's own subtree gone, backend nodes kept."""
        self._remove_subtree(self.tree, f"/local/domain/{domid}")
        self.generation += 1
        self._fire(f"/local/domain/{domid}")
        self._fire_special("@releaseDomain")

    def value(self, path: str) -> bytes | None:
        node = self.tree.get(path)
        return None if node is None else node.value

    # ---- server -------------------------------------------------------------
    async def _serve(self, conn: _Conn) -> None:
        parser = xs_wire.XsParser()
        try:
            while True:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                for msg in parser.feed(data):
                    reply = self._handle(conn, msg)
                    await self._send(conn, msg.type if reply[0] is None else reply[0],
                                     msg.req_id, msg.tx_id, reply[1])
        except (trio.BrokenResourceError, trio.ClosedResourceError, xs_wire.XsProtocolError):
            pass
        finally:
            if conn in self._conns:
                self._conns.remove(conn)

    async def _send(self, conn: _Conn, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        async with conn.send_lock:
            try:
                await conn.stream.send_all(xs_wire.encode(type_, req_id, tx_id, payload))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _queue_event(self, conn: _Conn, path: str, token: str) -> None:
        payload = xs_wire.watch_payload(path, token)
        self._nursery.start_soon(self._send, conn, XsType.WATCH_EVENT, 0, 0, payload)

    def _fire(self, changed: str) -> None:
        for conn in list(self._conns):
            for wpath, token in list(conn.watches):
                if wpath.startswith("@"):
                    continue
                if _is_under(changed, wpath) or _is_under(wpath, changed):
                    self._queue_event(conn, changed if _is_under(changed, wpath) else wpath,
                                      token)

    def _fire_special(self, name: str) -> None:
        for conn in list(self._conns):
            for wpath, token in list(conn.watches):
                if wpath == name:
                    self._queue_event(conn, name, token)

    # ---- permissions --------------------------------------------------------
    @staticmethod
    def _perm_of(node: _Node, domid: int) -> str:
        if domid == 0 or node.perms[0].domid == domid:
            return "b"
        for p in node.perms[1:]:
            if p.domid == domid:
                return p.perm
        return node.perms[0].perm

    def _check(self, tree: dict[str, _Node], conn: _Conn, path: str, want: str) -> None:
        node = tree.get(path)
        if node is None:
            raise _Err("ENOENT")
        if self._perm_of(node, conn.domid) not in (want, "b"):
            raise _Err("EACCES")

    # ---- operations ---------------------------------------------------------
    def _abs(self, conn: _Conn, path: str) -> str:
        if not path.startswith("/") and not path.startswith("@"):
            path = f"/local/domain/{conn.domid}/{path}"
        if len(path) > xs_wire.XENSTORE_ABS_PATH_MAX or "//" in path or \
                (len(path) > 1 and path.endswith("/")):
            raise _Err("EINVAL")
        return path

    def _create(self, tree: dict[str, _Node], conn: _Conn, path: str) -> list[str]:
        """Create path and missing ancestors; returns created paths."""
        missing = []
        p = path
        while p not in tree:
            missing.append(p)
            p = _parent(p)
        if missing:
            self._check(tree, conn, p, "w")
        for q in reversed(missing):
            perms = list(tree[_parent(q)].perms)
            if conn.domid:
                perms[0] = Permission(conn.domid, perms[0].perm)
            tree[q] = _Node(b"", perms)
        return missing

    @staticmethod
    def _remove_subtree(tree: dict[str, _Node], path: str) -> None:
        for p in [p for p in tree if _is_under(p, path)]:
            del tree[p]

    def _handle(self, conn: _Conn, msg: xs_wire.XsMessage) -> tuple[int | None, bytes]:
        name = XsType(msg.type).name if msg.type in XsType._value2member_map_ else str(msg.type)
        self.ops[name] = self.ops.get(name, 0) + 1
        try:
            return None, self._op(conn, msg)
        except _Err as err:
            return XsType.ERROR, xs_wire.error_payload(err.errno)
        except (ValueError, IndexError, UnicodeDecodeError):
            return XsType.ERROR, xs_wire.error_payload("EINVAL")

    def _op(self, conn: _Conn, msg: xs_wire.XsMessage) -> bytes:
        t = msg.type
        if msg.tx_id and msg.tx_id not in self._tx and t != XsType.TRANSACTION_START:
            raise _Err("ENOENT")
        tx = self._tx.get(msg.tx_id)
        tree = tx.tree if tx is not None else self.tree
        strings = xs_wire.split_strings(msg.payload)
        changed: list[str] = []
        if t == XsType.TRANSACTION_START:
            tid = next(self._tx_ids)
            self._tx[tid] = _Tx(self.generation, {k: _Node(v.value, list(v.perms))
                                                  for k, v in self.tree.items()})
            return f"{tid}\0".encode()
        if t == XsType.TRANSACTION_END:
            tx = self._tx.pop(msg.tx_id, None)
            if tx is None:
                raise _Err("ENOENT")
            if strings[:1] != ["T"]:
                return xs_wire.OK_PAYLOAD
            if tx.generation != self.generation:
                raise _Err("EAGAIN")
            before = self.tree
            self.tree = tx.tree
            self.generation += 1
            for p in set(before) | set(self.tree):
                a, b = before.get(p), self.tree.get(p)
                if a is None or b is None or a.value != b.value or a.perms != b.perms:
                    self._fire(p)
            return xs_wire.OK_PAYLOAD
        if t in (XsType.WATCH, XsType.UNWATCH):
            path = strings[0] if strings[0].startswith("@") else self._abs(conn, strings[0])
            key = (path, strings[1])
            if t == XsType.WATCH:
                if key in conn.watches:
                    raise _Err("EEXIST")
                conn.watches.add(key)
                self._queue_event(conn, path, strings[1])
            else:
                if key not in conn.watches:
                    raise _Err("ENOENT")
                conn.watches.discard(key)
            return xs_wire.OK_PAYLOAD
        if t == XsType.WRITE:
            raw_path, _, value = msg.payload.partition(b"\0")
            path = self._abs(conn, raw_path.decode())
            changed = self._create(tree, conn, path)
            self._check(tree, conn, path, "w")
            tree[path].value = bytes(value)
            changed.append(path)
        elif t == XsType.MKDIR:
            path = self._abs(conn, strings[0])
            changed = self._create(tree, conn, path)
        elif t == XsType.RM:
            path = self._abs(conn, strings[0])
            if path not in tree:
                if _parent(path) in tree:
                    return xs_wire.OK_PAYLOAD
                raise _Err("ENOENT")
            if path == "/":
                raise _Err("EINVAL")
            self._check(tree, conn, _parent(path), "w")
            self._remove_subtree(tree, path)
            changed = [path]
        elif t == XsType.READ:
            path = self._abs(conn, strings[0])
            self._check(tree, conn, path, "r")
            return tree[path].value
        elif t == XsType.DIRECTORY:
            path = self._abs(conn, strings[0])
            self._check(tree, conn, path, "r")
            prefix = path.rstrip("/") + "/"
            kids = sorted({p[len(prefix):] for p in tree
                           if p.startswith(prefix) and "/" not in p[len(prefix):] and p != path})
            return b"".join(k.encode() + b"\0" for k in kids)
        elif t == XsType.GET_PERMS:
            path = self._abs(conn, strings[0])
            self._check(tree, conn, path, "r")
            return b"".join(p.encode().encode() + b"\0" for p in tree[path].perms)
        elif t == XsType.SET_PERMS:
            path = self._abs(conn, strings[0])
            node = tree.get(path)
            if node is None:
                raise _Err("ENOENT")
            if conn.domid and node.perms[0].domid != conn.domid:
                raise _Err("EACCES")
            perms = xs_wire.parse_perms(msg.payload.split(b"\0", 1)[1])
            if not perms:
                raise _Err("EINVAL")
            node.perms = perms
            changed = [path]
        else:
            raise _Err("ENOSYS")
        if tx is None and changed:
            self.generation += 1
            for p in changed:
                self._fire(p)
        return xs_wire.OK_PAYLOAD
