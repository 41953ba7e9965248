"""The Python clients and hostile control clients against a real ``serve`` subprocess
(no guest booted): garbage, a 64 MiB line, 1,000 connections, every method with wrong
types; afterwards the bridge's RSS and fd count are bounded, it still answers, and a
vfio-user handshake on its data socket works. A non-root user cannot connect."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import trio

from bridge.control import jsonrpc as j
from bridge.control.client import BlockingControlClient, ControlClient, ControlError
from bridge.control.methods import METHODS
from bridge.control.pytest_plugin import vscsi_bridge, vscsi_bridge_factory  # noqa: F401
from bridge.vfio_user import protocol as vp

VM1 = "iqn.2026-11.org.vscsi-bridge:vfio-user.vm1"


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vfio_user_version(path: str) -> dict:
    """The first message QEMU sends: VERSION 0.1 with capabilities; the reply's JSON."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(vp.encode_message(1, vp.Command.VERSION,
                                    vp.encode_version(0, 1, {"max_msg_fds": 8})))
        head = b""
        while len(head) < vp.HEADER_SIZE:
            head += s.recv(vp.HEADER_SIZE - len(head))
        h = vp.parse_header(head)
        body = b""
        while len(body) < h.size - vp.HEADER_SIZE:
            body += s.recv(h.size - vp.HEADER_SIZE - len(body))
        assert h.msg_id == 1 and h.command == vp.Command.VERSION and h.error == 0
        return vp.parse_version(body).capabilities
    finally:
        s.close()


def test_blocking_client_every_method(vscsi_bridge):  # noqa: F811
    c = vscsi_bridge.client
    d = vscsi_bridge.directory
    assert {m["name"] for m in c.rpc_list()} == set(METHODS)
    assert c.bridge_version()["pid"] == vscsi_bridge.proc.pid
    assert c.bridge_config()["lu"][0]["name"] == "disk0"
    assert c.lu_add(name="b", path=str(d / "b.img"), size="2MiB")["size"] == 2 << 20
    assert c.lun_map(initiator=VM1, lun=4, lu="b")["lun"] == 4
    assert c.lu_resize(name="b", size=4 << 20)["size"] == 4 << 20
    assert c.attach_add(kind="vfio_user", socket="vm9.sock", luns={"0": "b"})["luns"] == {"0": "b"}
    assert len(c.attach_list()) == 2
    st = c.status()
    assert st["lun_maps"][VM1] == {"0": "disk0", "4": "b"}
    assert c.stats()["initiators"] == {} and "since" in c.stats_reset()
    assert c.pr_show(lu="b")["b"]["aptpl"] is False and c.pr_clear(lu="b")["generation"] == 1
    assert c.log_level(level="warning") == {"level": "warning"}
    assert c.config_save(path="x.toml")["path"] == str(d / "x.toml")
    assert c.attach_remove(id="vm9.sock")["initiator"].endswith("vm9")
    assert c.lun_unmap(initiator=VM1, lun=4)["lu"] == "b"
    assert c.lu_remove(name="b")["unmapped"] == []
    with pytest.raises(ControlError) as e:
        c.lu_remove(name="b")
    assert e.value.code == j.NOT_FOUND and e.value.refused
    with pytest.raises(ControlError) as e:
        c.no_such_method()
    assert e.value.code == j.METHOD_NOT_FOUND


async def test_trio_client_same_names(vscsi_bridge):  # noqa: F811
    async with await ControlClient.connect(vscsi_bridge.control_socket) as c:
        assert [lu["name"] for lu in await c.lu_list()] == ["disk0"]
        assert (await c.lu_add(name="t", path=str(vscsi_bridge.directory / "t.img"), size=1 << 20))["name"] == "t"
        assert (await c.call("lu.remove", name="t"))["name"] == "t"
        with pytest.raises(ControlError) as e:
            await c.lu_resize(name="disk0", size=True)
        assert e.value.code == j.INVALID_PARAMS and "size: must be" in e.value.message


def _answers(sock: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return [json.loads(x) for x in buf.splitlines()]


def test_hostile_control_clients(vscsi_bridge):  # noqa: F811
    b = vscsi_bridge
    pid = b.proc.pid
    b.client.status()
    rss0, fds0 = rss_kib(pid), fds(pid)

    # garbage of every kind on one connection: an error each, the connection stays usable
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(b.control_socket)
    junk = [b"\x00\xff garbage", b"{", b"[]", b'"str"', b"null", b'{"jsonrpc":"2.0"}',
            b'{"jsonrpc":"2.0","method":"lu.list","id":[1]}', b"[" * 200000,
            b'{"jsonrpc":"2.0","method":"status","id":9}']
    s.sendall(b"\n".join(junk) + b"\n")
    got = _answers(s, len(junk))
    assert all("error" in g for g in got[:-1]) and got[-1]["id"] == 9 and "result" in got[-1]
    s.close()

    # a 64 MiB line: an error line, then the connection is closed; nothing is buffered
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(b.control_socket)
    chunk = b"A" * (1 << 20)
    sent = 0
    try:
        while sent < 64 << 20:
            s.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 64 << 20  # the bridge stopped reading long before
    try:
        got = _answers(s, 1)
        assert got[0]["error"]["code"] == j.INVALID_REQUEST and "longer than" in got[0]["error"]["message"]
    except ConnectionResetError:
        pass  # the reset may overtake the error line when our send buffer was still full
    s.close()

    # every method with every parameter of a wrong type, over the socket
    with BlockingControlClient(b.control_socket) as c:
        for m in METHODS.values():
            for p in m.params:
                bad = "text" if str not in p.types else 12345
                with pytest.raises(ControlError) as e:
                    c.call(m.name, **{p.name: bad})
                assert e.value.code == j.INVALID_PARAMS

    # 1,000 connections: 64 are served at once, the others get an error line and are closed
    held, refused = [], 0
    for _ in range(1000):
        x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        x.connect(b.control_socket)  # blocking: waits while the accept backlog is full
        x.settimeout(30)
        held.append(x)
    for x in held:
        try:
            x.sendall(b'{"jsonrpc":"2.0","method":"bridge.version","id":1}\n')
        except BrokenPipeError:
            pass  # a refused one: closed already, its error line is waiting
    for x in held:
        got = _answers(x, 1)
        if got and "error" in got[0]:
            assert got[0]["error"]["code"] == j.TOO_MANY_CLIENTS
            refused += 1
        else:
            assert got[0]["result"]["pid"] == pid
    assert refused >= 1000 - 64
    for x in held:
        x.close()

    # the bridge is unharmed: it answers, its memory and fds came back, vfio-user works
    deadline = time.monotonic() + 10
    while fds(pid) > fds0 + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds(pid) <= fds0 + 2, (fds0, fds(pid))
    assert rss_kib(pid) < rss0 + 32 * 1024, (rss0, rss_kib(pid))
    assert b.client.status()["pid"] == pid
    caps = vfio_user_version(b.socket("vm1.sock"))
    assert caps["max_msg_fds"] >= 1
    assert b.proc.poll() is None


def test_non_root_user_cannot_connect(vscsi_bridge):  # noqa: F811
    b = vscsi_bridge
    os.chmod(b.directory, 0o755)  # only the socket's own mode stands in the way

    def connect_as_nobody() -> int:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(b.control_socket)
                    code = 0
                except PermissionError:
                    code = 1
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert os.stat(b.control_socket).st_mode & 0o777 == 0o600
    assert connect_as_nobody() == 1
    os.chmod(b.control_socket, 0o666)  # the control: with the mode opened, nobody gets in
    assert connect_as_nobody() == 0


async def test_many_trio_clients_at_once(vscsi_bridge):  # noqa: F811
    async def one(i: int) -> None:
        async with await ControlClient.connect(vscsi_bridge.control_socket) as c:
            for _ in range(5):
                assert (await c.status())["pid"] == vscsi_bridge.proc.pid

    async with trio.open_nursery() as n:
        for i in range(32):
            n.start_soon(one, i)

