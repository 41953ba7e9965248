"""Xenstore codec, trio client and the simulated xenstored talking the same wire protocol."""

import pytest
import trio

from bridge.xen import xs_wire
from bridge.xen.xenstore import open_xenstore
from bridge.xen.xs_wire import Permission, XenStoreError, XsType
from tests.xen_sim.xenstored import SimXenstored


def test_codec_roundtrip_and_split_messages():
    msg = xs_wire.encode(XsType.WRITE, 7, 3, xs_wire.write_payload("/a/b", "v"))
    assert msg[:16] == bytes.fromhex("0b000000" "07000000" "03000000" "06000000")
    parser = xs_wire.XsParser()
    assert list(parser.feed(msg[:10])) == []
    (out,) = list(parser.feed(msg[10:]))
    assert (out.type, out.req_id, out.tx_id, out.payload) == (11, 7, 3, b"/a/b\0v")


def test_codec_rejects_oversized():
    with pytest.raises(ValueError):
        xs_wire.encode(XsType.WRITE, 1, 0, b"x" * 4097)
    bad = xs_wire.HEADER.pack(2, 1, 0, 5000)
    with pytest.raises(xs_wire.XsProtocolError):
        list(xs_wire.XsParser().feed(bad))


def test_perms_and_watch_event_parsing():
    perms = xs_wire.parse_perms(b"n0\0r5\0")
    assert perms == [Permission(0, "n"), Permission(5, "r")]
    assert xs_wire.set_perms_payload("/x", perms) == b"/x\0n0\0r5\0"
    assert xs_wire.parse_watch_event(b"/a/b\0tok\0") == ("/a/b", "tok")
    with pytest.raises(xs_wire.XsProtocolError):
        xs_wire.parse_perms(b"q1\0")


async def test_client_against_sim_basic_ops(nursery):
    sim = SimXenstored(nursery)
    async with open_xenstore(await sim.connect(0)) as xs:
        await xs.write("/a/b/c", "hello")
        assert await xs.read("/a/b/c") == b"hello"
        assert await xs.directory("/a/b") == ["c"]
        await xs.mkdir("/a/d")
        assert sorted(await xs.directory("/a")) == ["b", "d"]
        await xs.rm("/a/b")
        assert await xs.directory("/a") == ["d"]
        with pytest.raises(XenStoreError) as exc:
            await xs.read("/a/b/c")
        assert exc.value.errno == "ENOENT"
        await xs.set_perms("/a/d", [Permission(0, "n"), Permission(3, "r")])
        assert await xs.get_perms("/a/d") == [Permission(0, "n"), Permission(3, "r")]
        assert await xs.read_int("/nope", 42) == 42


async def test_permissions_enforced_for_domu(nursery):
    sim = SimXenstored(nursery)
    sim.introduce_domain(5, "guest")
    async with open_xenstore(await sim.connect(0)) as xs0, \
            open_xenstore(await sim.connect(5)) as xs5:
        await xs0.write("/local/domain/0/backend/x", "secret")
        with pytest.raises(XenStoreError) as exc:
            await xs5.read("/local/domain/0/backend/x")
        assert exc.value.errno == "EACCES"
        await xs0.set_perms("/local/domain/0/backend/x", [Permission(0, "n"), Permission(5, "r")])
        assert await xs5.read("/local/domain/0/backend/x") == b"secret"
        with pytest.raises(XenStoreError):
            await xs5.write("/local/domain/0/backend/x", "mine")
        await xs5.write("/local/domain/5/device/thing", "ok")  # own subtree
        assert (await xs0.get_perms("/local/domain/5/device/thing"))[0].domid == 5


async def test_watch_fires_on_register_and_change(nursery):
    sim = SimXenstored(nursery)
    async with open_xenstore(await sim.connect(0)) as xs:
        async with xs.watch("/w") as w:
            with trio.fail_after(2):
                assert await w.wait() == {"/w"}
                await xs.write("/w/x", "1")
                await xs.write("/other", "1")
                fired = await w.wait()
            assert "/w/x" in fired and "/other" not in fired
            await xs.write("/w/x", "1")
            await xs.rm("/w")
            with trio.fail_after(2):
                while "/w" not in await w.wait():
                    pass  # events arrive asynchronously; the removal one must come


async def test_transaction_conflict_retries(nursery):
    sim = SimXenstored(nursery)
    attempts = []
    async with open_xenstore(await sim.connect(0)) as xs, \
            open_xenstore(await sim.connect(0)) as other:
        await xs.write("/t/n", "0")

        async def body(tx: int) -> int:
            attempts.append(tx)
            value = int(await xs.read("/t/n", tx))
            if len(attempts) == 1:
                await other.write("/t/n", "10")  # a concurrent commit: first attempt must fail
            await xs.write("/t/n", str(value + 1), tx)
            return value

        assert await xs.transact(body) == 10
        assert len(attempts) == 2
        assert await xs.read("/t/n") == b"11"


async def test_transaction_abort_discards(nursery):
    sim = SimXenstored(nursery)
    async with open_xenstore(await sim.connect(0)) as xs:
        tx = await xs.transaction_start()
        await xs.write("/t2", "x", tx)
        assert await xs.read("/t2", tx) == b"x"
        assert not await xs.exists("/t2")
        await xs.transaction_end(tx, commit=False)
        assert not await xs.exists("/t2")


async def test_special_watches(nursery):
    sim = SimXenstored(nursery)
    async with open_xenstore(await sim.connect(0)) as xs:
        async with xs.watch("@releaseDomain") as w:
            with trio.fail_after(2):
                await w.wait()
                sim.introduce_domain(4, "g")
                sim.release_domain(4)
                assert await w.wait() == {"@releaseDomain"}
        assert not await xs.exists("/local/domain/4")
