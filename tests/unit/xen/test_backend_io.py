"""Handshake and I/O through the backend with the real target core, on the simulated platform."""

import os
import struct

import trio

from bridge.xen import vscsiif
from bridge.xen.backend import BackendConfig

from .conftest import DOMID, INITIATOR, running_backend, wait_value

INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


TUR = bytes(6)


async def clear_ua(fe, nexus=(0, 0, 0)) -> None:
    """Consume the power-on unit attention (SAM-5 5.14) as an initiator's scan does."""
    for _ in range(4):
        if (await fe.submit(TUR, nexus)).rslt == 0:
            return
    raise AssertionError("unit attention does not clear")


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


async def test_handshake_nodes_and_states(env):
    async with running_backend(env) as (backend, fe, _):
        be = fe.backend
        xs = env.xs0
        assert await xs.read_int(f"{be}/state") == 4
        assert await xs.read_int(f"{fe.path}/state") == 4
        assert await xs.read_int(f"{be}/feature-sg-grant") == 128
        await wait_value(xs, f"{be}/vscsi-devs/dev-0/state", 4)
        assert fe.devices == {(0, 0, 0)}
        assert backend.initiator.name == INITIATOR
        assert backend.luns == {(0, 0, 0): 0}


async def test_inquiry_and_read_write_roundtrip(env):
    async with running_backend(env) as (backend, fe, _):
        with trio.fail_after(5):
            r = await fe.submit(INQUIRY, data_in_len=96)
        assert r.rslt == 0
        assert r.data[8:16] == b"VSCSIBRG"
        await clear_ua(fe)
        payload = os.urandom(8 * 512)
        with trio.fail_after(5):
            w = await fe.submit(write10(10, 8), data_out=payload)
            assert w.rslt == 0 and w.residual == 0
            r = await fe.submit(read10(10, 8), data_in_len=len(payload))
        assert r.rslt == 0 and r.data == payload
        assert fe.leaked_grants == []
        assert env.sim.grant_table.mapped_count() == 1  # only the ring page stays mapped


async def test_sg_grant_large_request_and_unaligned_segments(env):
    async with running_backend(env) as (_, fe, _):
        await clear_ua(fe)
        payload = os.urandom(128 * 4096 - 4096)  # 127 pages: beyond 26 direct segments
        with trio.fail_after(10):
            w = await fe.submit(write10(0, len(payload) // 512), data_out=payload)
            assert w.rslt == 0
            r = await fe.submit(read10(0, len(payload) // 512), data_in_len=len(payload))
        assert r.rslt == 0 and r.data == payload
        # 512-byte segments: the segment lengths, not page counts, carry the data
        small = os.urandom(4096)
        with trio.fail_after(5):
            w = await fe.submit(write10(2000, 8), data_out=small, seg_size=512)
            r = await fe.submit(read10(2000, 8), data_in_len=4096, seg_size=512, sg_grant=True)
        assert w.rslt == 0 and r.data == small
        assert fe.leaked_grants == []


async def test_check_condition_carries_sense(env):
    async with running_backend(env) as (_, fe, _):
        await clear_ua(fe)
        with trio.fail_after(5):
            r = await fe.submit(read10(0xFFFFFF, 1), data_in_len=512)
        assert vscsiif.RsltHost.OK == r.host
        assert r.status == 0x02
        assert len(r.sense) >= 14 and r.sense[2] & 0xF == 0x5  # ILLEGAL REQUEST
        assert r.residual == 512


async def test_unknown_nexus_is_no_connect(env):
    async with running_backend(env) as (_, fe, _):
        with trio.fail_after(5):
            r = await fe.submit(INQUIRY, nexus=(0, 0, 7), data_in_len=96)
        assert r.host == vscsiif.RsltHost.NO_CONNECT


async def test_grant_copy_strategy_same_results(env):
    cfg = BackendConfig(grant_strategy="copy")
    async with running_backend(env, config=cfg) as (_, fe, _):
        await clear_ua(fe)
        payload = os.urandom(64 * 4096)
        with trio.fail_after(10):
            assert (await fe.submit(write10(0, 512), data_out=payload)).rslt == 0
            r = await fe.submit(read10(0, 512), data_in_len=len(payload))
        assert r.data == payload
        assert env.sim.grants.ops["copy_ioctl"] >= 3  # indirect pages, data out, data in
        assert env.sim.grants.ops["map_ioctl"] == 1  # the ring only
        assert fe.leaked_grants == []


async def test_queue_depth_fills_ring(env):
    async with running_backend(env) as (backend, fe, _):
        await clear_ua(fe)
        results = []
        before = backend.stats["requests"]

        async def one(i):
            results.append(await fe.submit(read10(i * 8, 8), data_in_len=4096))

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for i in range(40):  # more than the 16 ring slots
                    n.start_soon(one, i)
        assert len(results) == 40 and all(r.rslt == 0 for r in results)
        assert backend.stats["requests"] - before == 40
        assert DOMID == backend.domid
