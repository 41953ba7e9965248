"""The control socket in process: framing, bounds, permissions, hostile clients."""

from __future__ import annotations

import json
import os
import socket
import stat

import trio

from bridge.control import jsonrpc as j
from bridge.control.client import ControlClient, ControlError
from bridge.control.server import ControlServer
from bridge.startup import StartupError


async def start(nursery, ctl, run_dir, **limits):
    server = ControlServer(ctl, **limits)
    path = str(run_dir / "control.sock")
    await nursery.start(lambda task_status: server.serve(path, task_status=task_status))
    return server, path


async def lines(stream, n):
    buf = b""
    while buf.count(b"\n") < n:
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
    return [json.loads(x) for x in buf.splitlines()]


async def test_mode_0600_and_a_client_round_trip(nursery, ctl, run_dir):
    _, path = await start(nursery, ctl, run_dir)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with await ControlClient.connect(path) as c:
        assert [lu["name"] for lu in await c.lu_list()] == ["disk0", "disk1"]
        assert (await c.call("log.level"))["level"] == "info"
        try:
            await c.lu_remove(name="nope")
        except ControlError as e:
            assert e.code == j.NOT_FOUND and e.refused
        else:
            raise AssertionError("no error")


async def test_garbage_then_good_requests_on_one_connection(nursery, ctl, run_dir):
    _, path = await start(nursery, ctl, run_dir)
    s = await trio.open_unix_socket(path)
    await s.send_all(b"garbage\n\n[1,2]\n{\"jsonrpc\":\"2.0\",\"method\":\"nope\",\"id\":1}\n"
                     b"{\"jsonrpc\":\"2.0\",\"method\":\"lu.list\"}\n"  # notification: no answer
                     b"{\"jsonrpc\":\"2.0\",\"method\":\"lu.list\",\"id\":\"x\"}\n")
    got = await lines(s, 4)
    assert [g.get("error", {}).get("code") for g in got] == [j.PARSE_ERROR, j.INVALID_REQUEST,
                                                            j.METHOD_NOT_FOUND, None]
    assert got[3]["id"] == "x" and len(got[3]["result"]) == 2
    await s.aclose()


async def test_oversized_line_closes_only_that_connection(nursery, ctl, run_dir):
    server, path = await start(nursery, ctl, run_dir, max_request=4096)
    good = await ControlClient.connect(path)
    bad = await trio.open_unix_socket(path)
    try:
        with trio.move_on_after(5):
            while True:
                await bad.send_all(b"x" * 65536)
    except trio.BrokenResourceError:
        pass
    got = await lines(bad, 1)
    assert got[0]["error"]["code"] == j.INVALID_REQUEST and "longer than 4096" in got[0]["error"]["message"]
    try:  # closed (reset: the server did not read the rest of the line)
        assert await bad.receive_some(10) == b""
    except trio.BrokenResourceError:
        pass
    assert len(await good.lu_list()) == 2
    await good.aclose()
    await bad.aclose()


async def test_too_many_clients_get_an_error_line(nursery, ctl, run_dir):
    server, path = await start(nursery, ctl, run_dir, max_clients=3)
    held = [await ControlClient.connect(path) for _ in range(3)]
    for c in held:
        await c.status()
    extra = await trio.open_unix_socket(path)
    got = await lines(extra, 1)
    assert got[0]["error"]["code"] == j.TOO_MANY_CLIENTS
    assert await extra.receive_some(10) == b""
    await held[0].aclose()
    await trio.sleep(0.05)
    again = await ControlClient.connect(path)
    assert (await again.stats())["initiators"] == {}
    for c in [again, *held[1:]]:
        await c.aclose()
    await extra.aclose()
    await trio.sleep(0.05)
    assert server.clients == 0 and server.refused == 1


async def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(nursery, ctl, run_dir):
    _, path = await start(nursery, ctl, run_dir)
    second = ControlServer(ctl)
    try:
        await second.serve(path)
    except StartupError as e:
        assert "another process is listening" in str(e)
    else:
        raise AssertionError("took over a live socket")
    stale = str(run_dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: a bridge that died
    await nursery.start(lambda task_status: ControlServer(ctl).serve(stale, task_status=task_status))
    assert stat.S_ISSOCK(os.stat(stale).st_mode)


async def test_owner_group_and_mode_are_parameters(nursery, ctl, run_dir):
    server = ControlServer(ctl)
    path = str(run_dir / "ops.sock")
    await nursery.start(lambda task_status: server.serve(path, mode=0o660, group=65534,
                                                         task_status=task_status))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534 and st.st_uid == os.getuid()
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
