"""Grant copy strategy: the data-in of every READ answered in one pass over the ring goes
back in one GNTTABOP_copy; a bad grant among them fails only its own request."""

import os

import trio

from bridge.xen import vscsiif
from bridge.xen.backend import BackendConfig
from bridge.xen.vscsiif import RsltHost, Segment

from .conftest import running_backend
from .frontend import raw_request
from .test_backend_io import clear_ua, read10, write10

COPY = BackendConfig(grant_strategy="copy")
N = 12  # reads put on the ring together (16 slots)


async def _write_blocks(fe) -> bytes:
    payload = os.urandom(N * 4096)
    with trio.fail_after(10):
        assert (await fe.submit(write10(0, N * 8), data_out=payload)).rslt == 0
    return payload


async def test_reads_of_one_pass_copied_back_together(env):
    async with running_backend(env, config=COPY) as (_, fe, _):
        await clear_ua(fe)
        payload = await _write_blocks(fe)
        before = env.sim.grants.ops["copy_ioctl"]
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            r = await fe.submit(read10(i * 8, 8), data_in_len=4096)
            assert r.rslt == 0
            results[i] = r.data

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for i in range(N):
                    n.start_soon(one, i)
        assert all(results[i] == payload[i * 4096:(i + 1) * 4096] for i in range(N))
        copies = env.sim.grants.ops["copy_ioctl"] - before
        assert copies < N / 2, copies  # one per pass over the ring, not one per request
        assert fe.leaked_grants == []


async def test_bad_grant_in_a_pass_fails_alone(env):
    async with running_backend(env, config=COPY) as (_, fe, _):
        await clear_ua(fe)
        payload = await _write_blocks(fe)
        page = fe.mem.alloc_page()
        ro = fe.sim.grant_table.grant(fe.domid, 0, page, True)  # read-only: data-in fails
        results: dict[int, bytes] = {}
        bad = []

        async def one(i: int) -> None:
            r = await fe.submit(read10(i * 8, 8), data_in_len=4096)
            assert r.rslt == 0
            results[i] = r.data

        async def hostile() -> None:
            rq = fe.next_rqid_hint()
            bad.append(await fe.send_raw(raw_request(
                rq, cdb=read10(0, 8), direction=vscsiif.DMA_FROM_DEVICE, nr_segments=1,
                segs=[Segment(ro, 0, 4096)])))

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for i in range(N // 2):
                    n.start_soon(one, i)
                n.start_soon(hostile)
                for i in range(N // 2, N):
                    n.start_soon(one, i)
        assert bad[0].rslt == vscsiif.rslt(RsltHost.ERROR, 0)
        assert all(results[i] == payload[i * 4096:(i + 1) * 4096] for i in range(N))
        assert fe.leaked_grants == []
