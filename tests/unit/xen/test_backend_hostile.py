"""Hostile frontends: every bad request gets an error response; a broken ring disconnects
that device alone; the backend never dies and never keeps a grant mapped."""

import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.scsi.request import ScsiResponse, TaskManagementFunction
from bridge.xen import vscsiif
from bridge.xen.backend import BackendConfig
from bridge.xen.vscsiif import RsltHost, Segment

from .conftest import running_backend, wait_value
from .frontend import raw_request
from .test_backend_io import INQUIRY, clear_ua, read10

ERROR = vscsiif.rslt(RsltHost.ERROR, 0)


async def assert_still_serves(fe) -> None:
    with trio.fail_after(5):
        r = await fe.submit(INQUIRY, data_in_len=96)
    assert r.rslt == 0 and r.data[8:16] == b"VSCSIBRG"


def grant_pages(fe, n: int, readonly: bool) -> list[int]:
    refs = []
    for _ in range(n):
        page = fe.mem.alloc_page()
        refs.append(fe.sim.grant_table.grant(fe.domid, 0, page, readonly))
    return refs



async def _answer(started):
    """Target.submit's result awaited: an immediate response or its coroutine's."""
    return started if isinstance(started, ScsiResponse) else await started

async def test_bad_requests_get_error_responses(env):
    async with running_backend(env) as (backend, fe, _):
        rq = fe.next_rqid_hint()
        ro = grant_pages(fe, 1, readonly=True)[0]
        indirect_page = fe.mem.alloc_page()
        vscsiif.SEGMENT.pack_into(fe.mem.page(indirect_page), 0, ro, 4000, 200)  # crosses page
        indirect = fe.sim.grant_table.grant(fe.domid, 0, indirect_page, True)
        cases = {
            "unknown act": raw_request(rq, act=9),
            "SG_PRESET": raw_request(rq, act=vscsiif.VSCSIIF_ACT_SCSI_SG_PRESET),
            "cmd_len 17": raw_request(rq, cmd_len=17),
            "cmd_len 0": raw_request(rq, cmd_len=0),
            "bidirectional": raw_request(rq, direction=vscsiif.DMA_BIDIRECTIONAL),
            "direction 7": raw_request(rq, direction=7),
            "27 direct segments": raw_request(rq, cdb=read10(0, 1), direction=2, nr_segments=27,
                                              segs=[Segment(ro, 0, 512)] * 26),
            "segment beyond page": raw_request(rq, cdb=read10(0, 1), direction=1, nr_segments=1,
                                               segs=[Segment(ro, 4000, 512)]),
            "bad grant": raw_request(rq, cdb=read10(0, 1), direction=2, nr_segments=1,
                                     segs=[Segment(99999, 0, 512)]),
            "read-only grant for data-in": raw_request(rq, cdb=read10(0, 1), direction=2,
                                                       nr_segments=1, segs=[Segment(ro, 0, 512)]),
            "indirect beyond feature-sg-grant": raw_request(
                rq, cdb=read10(0, 1), direction=2, nr_segments=0x81,
                segs=[Segment(indirect, 0, 129 * 8)]),
            "indirect length not a multiple of 8": raw_request(
                rq, cdb=read10(0, 1), direction=2, nr_segments=0x81, segs=[Segment(indirect, 0, 12)]),
            "indirect entry beyond page": raw_request(
                rq, cdb=read10(0, 1), direction=1, nr_segments=0x81, segs=[Segment(indirect, 0, 8)]),
        }
        for name, req in cases.items():
            r = await fe.send_raw(req)
            assert r.rslt == ERROR, name
            fe._free_rqids.insert(0, rq)
        assert backend.stats["errors"] >= len(cases)
        assert env.sim.grant_table.mapped_count() == 1  # the ring only: nothing leaked
        await assert_still_serves(fe)


async def test_segments_with_dma_none_are_ignored(env):
    """xen-scsifront's error handler sends TEST UNIT READY with the failed command's stale
    segments and DMA_NONE: the command runs, nothing is mapped (as xen-scsiback)."""
    async with running_backend(env) as (backend, fe, _):
        await clear_ua(fe)
        rq = fe.next_rqid_hint()
        ro = grant_pages(fe, 1, readonly=True)[0]
        r = await fe.send_raw(raw_request(rq, nr_segments=1, segs=[Segment(ro, 0, 512)]))
        assert r.rslt == 0
        fe._free_rqids.insert(0, rq)
        assert env.sim.grant_table.mapped_count() == 1  # the ring only
        stale = raw_request(rq, nr_segments=1, segs=[Segment(99999, 0, 512)])  # not even a grant
        assert (await fe.send_raw(stale)).rslt == 0
        fe._free_rqids.insert(0, rq)
        await assert_still_serves(fe)


async def test_sg_grant_refused_when_not_offered(env):
    async with running_backend(env, config=BackendConfig(sg_grant=0)) as (_, fe, _):
        assert fe.sg_grant == 0
        await clear_ua(fe)
        with trio.fail_after(5):
            r = await fe.submit(read10(0, 8), data_in_len=4096, sg_grant=True)
        assert r.rslt == ERROR
        with trio.fail_after(5):
            r = await fe.submit(read10(0, 8), data_in_len=4096)
        assert r.rslt == 0


@pytest.mark.parametrize("strategy", ["map", "copy"])
async def test_rqid_already_in_flight(env, monkeypatch, strategy):
    gate = trio.Event()
    real_submit = env.target.submit

    async def gated(req):
        if bytes(req.cdb[:1]) == b"\x28":
            await gate.wait()
        return await _answer(real_submit(req))

    monkeypatch.setattr(env.target, "submit", gated)  # every command through the gate (a task)
    async with running_backend(env, config=BackendConfig(grant_strategy=strategy)) as (
            backend, fe, n):
        await clear_ua(fe)
        rq = fe.next_rqid_hint()
        started = trio.Event()
        results = []

        async def slow():
            results.append(await fe.submit(read10(0, 1), data_in_len=512, start=started))

        n.start_soon(slow)
        await started.wait()
        with trio.fail_after(5):
            while rq not in backend.conn.inflight:
                await trio.sleep(0.001)
        fe.push(vscsiif.encode_request(raw_request(rq, cdb=INQUIRY, direction=2)))
        with trio.fail_after(5):
            while not results:
                await trio.sleep(0.001)
        assert results[0].rslt == ERROR  # the duplicate's error answer carries that rqid
        gate.set()
        with trio.fail_after(5):
            while not fe.stray_responses:
                await trio.sleep(0.001)
        assert fe.stray_responses[0].rqid == rq
        # The frontend took the duplicate's answer for its request and ended the grants:
        # data already in its pages (map) is answered OK, data still to copy cannot be.
        assert fe.stray_responses[0].rslt == (0 if strategy == "map" else ERROR)


async def test_broken_ring_disconnects_only_that_device(env, caplog):
    async with running_backend(env, domid=5, name="victim") as (b1, fe1, _), \
            running_backend(env, domid=6, name="bystander") as (b2, fe2, _):
        await clear_ua(fe2)
        page = fe1.ring.page
        struct.pack_into("<I", page, 0, 17)  # req_prod 17 ahead of rsp_prod 0 on a 16-slot ring
        fe1.evtchn.notify()
        await wait_value(env.xs0, f"{fe1.backend}/state", 6)  # Closing, then Closed
        assert b1.conn is None
        assert any("broken ring" in r.getMessage() for r in caplog.records)
        assert env.sim.grant_table.mapped_count() == 1  # only the bystander's ring
        await assert_still_serves(fe2)


async def test_abort_and_reset_become_tmfs(env, monkeypatch):
    gate = trio.Event()
    seen_tags = {}
    tmfs = []
    real_submit = env.target.submit
    real_tmf = env.target.task_management

    async def gated(req):
        if bytes(req.cdb[:1]) == b"\x28":
            seen_tags["read"] = req.tag
            await gate.wait()
        return await _answer(real_submit(req))

    async def recording_tmf(tmf):
        tmfs.append(tmf)
        return await real_tmf(tmf)

    monkeypatch.setattr(env.target, "submit", gated)  # every command through the gate (a task)
    monkeypatch.setattr(env.target, "task_management", recording_tmf)
    async with running_backend(env) as (backend, fe, n):
        await clear_ua(fe)
        rq = fe.next_rqid_hint()
        started = trio.Event()
        done = []

        async def slow():
            done.append(await fe.submit(read10(0, 1), data_in_len=512, start=started))

        n.start_soon(slow)
        await started.wait()
        with trio.fail_after(5):
            while rq not in backend.conn.inflight:
                await trio.sleep(0.001)
            r = await fe.submit(b"", act=vscsiif.VSCSIIF_ACT_SCSI_ABORT, ref_rqid=rq)
        assert r.rslt == vscsiif.XEN_VSCSIIF_RSLT_RESET_SUCCESS
        assert tmfs[-1].function is TaskManagementFunction.ABORT_TASK and tmfs[-1].tag == seen_tags["read"]  # ABORT_TASK
        assert tmfs[-1].initiator == backend.initiator
        gate.set()
        with trio.fail_after(5):
            r = await fe.submit(b"", act=vscsiif.VSCSIIF_ACT_SCSI_RESET)
        assert r.rslt == vscsiif.XEN_VSCSIIF_RSLT_RESET_SUCCESS
        assert tmfs[-1].function is TaskManagementFunction.LOGICAL_UNIT_RESET
        # abort of a command that is not in flight: nothing to do, success without a TMF
        n_tmfs = len(tmfs)
        with trio.fail_after(5):
            r = await fe.submit(b"", act=vscsiif.VSCSIIF_ACT_SCSI_ABORT, ref_rqid=12)
        assert r.rslt == vscsiif.XEN_VSCSIIF_RSLT_RESET_SUCCESS and len(tmfs) == n_tmfs
        # reset on a nexus with no device fails
        with trio.fail_after(5):
            r = await fe.submit(b"", (0, 0, 9), act=vscsiif.VSCSIIF_ACT_SCSI_RESET)
        assert r.rslt == vscsiif.XEN_VSCSIIF_RSLT_RESET_FAILED
        with trio.fail_after(5):
            while not done:
                await trio.sleep(0.001)


slot = st.builds(
    lambda rqid, act, cmd_len, cdb, nexus, direction, nr, segs: raw_request(
        rqid, act=act, cmd_len=cmd_len, cdb=cdb, nexus=nexus, direction=direction,
        nr_segments=nr, segs=segs),
    st.integers(0, 15), st.sampled_from([0, 1, 1, 1, 2, 3, 4, 200]), st.integers(0, 255),
    st.binary(min_size=16, max_size=16), st.sampled_from([(0, 0, 0), (0, 0, 1), (3, 70, 300)]),
    st.integers(0, 255), st.integers(0, 255),
    # gref 8 is the ring page: a guest scribbling on its own ring is the broken-ring test
    st.lists(st.builds(Segment, st.integers(9, 24), st.integers(0, 0xFFFF),
                       st.integers(0, 0xFFFF)), max_size=26))


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(slot, min_size=1, max_size=16))
def test_fuzzed_slots_each_get_one_response(tmp_path_factory, batch):
    from bridge.xen.xenstore import open_xenstore
    from tests.xen_sim.platform import SimXen
    from tests.xen_sim.xenstored import SimXenstored

    from .conftest import Env, make_target

    async def main():
        async with trio.open_nursery() as nursery:
            target = make_target(tmp_path_factory.mktemp("fuzz"))
            xsd = SimXenstored(nursery)
            async with open_xenstore(await xsd.connect(0)) as xs0:
                env = Env(SimXen(), xsd, xs0, target, nursery)
                async with running_backend(env) as (backend, fe, _):
                    grant_pages(fe, 4, readonly=True)  # refs 9-12
                    grant_pages(fe, 4, readonly=False)  # refs 13-16
                    for req in batch:
                        fe.push(vscsiif.encode_request(req))
                    with trio.fail_after(10):
                        while fe.responses_seen < len(batch):
                            await trio.sleep(0.001)
                    assert backend.conn is not None
                    assert env.sim.grant_table.mapped_count() == 1
            target.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
