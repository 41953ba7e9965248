"""Task set, task management functions, unit attentions and target events."""

from __future__ import annotations

import struct
import time

import pytest
import trio
import trio.testing

from bridge.scsi.events import CapacityChanged, LunAdded, LunRemoved
from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ServiceResponse,
    TaskManagementFunction,
    TmfRequest,
    TmfServiceResponse,
)
from bridge.scsi.sense import SenseKey

from .helpers import (
    INI_A,
    INI_B,
    MiB,
    assert_check,
    assert_good,
    drain_ua,
    make_target,
    read10,
    run,
)

OK = ServiceResponse.COMMAND_COMPLETE
DONE = TmfServiceResponse.FUNCTION_COMPLETE


@pytest.fixture
def target(tmp_path):
    t = make_target(tmp_path, extra_luns=True)
    yield t
    t.close()


class BlockingRead:
    """Replaces a backing's read_into: blocks (cancellably, or in a worker thread)."""

    def __init__(self, in_thread: bool = False) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self.in_thread = in_thread
        self.finished = 0

    async def read_into(self, offset, views) -> None:
        self.entered.set()
        if self.in_thread:
            await trio.to_thread.run_sync(time.sleep, 0.2)
        else:
            await self.release.wait()
        self.finished += 1


def install(target, blocker: BlockingRead) -> None:
    backing = target.logical_unit("disk0").backing
    backing.nowait_reads = False  # no inline fast path: every READ goes through read_into
    backing.read_into = blocker.read_into


def req(tag, lun=0, initiator=INI_A):
    return ScsiRequest(lun=lun, tag=tag, cdb=read10(0, 1),
                       initiator=InitiatorPort(initiator), data_in=[memoryview(bytearray(512))])


def tmf(subtype, tag=0, lun=0, initiator=INI_A):
    return TmfRequest(subtype, lun, tag, InitiatorPort(initiator))


async def start_blocked(nursery, target, blocker, events, *reqs):
    for r in reqs:
        async def one(r=r):
            resp = await target.execute(r)
            events.append(("cmd", r.initiator.name, r.tag, resp.response))
        nursery.start_soon(one)
    await blocker.entered.wait()
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("in_thread", [False, True])
async def test_abort_task_completes_command_before_tmf(target, in_thread):
    await drain_ua(target)
    blocker = BlockingRead(in_thread)
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(7))
        # QUERY TASK sees it in flight
        assert (await target.task_management(tmf(TaskManagementFunction.QUERY_TASK, 7))).response == \
            TmfServiceResponse.FUNCTION_SUCCEEDED
        resp = await target.task_management(tmf(TaskManagementFunction.ABORT_TASK, 7))
        events.append(("tmf", resp.response))
    assert events == [("cmd", INI_A, 7, ServiceResponse.TASK_ABORTED), ("tmf", DONE)]
    if in_thread:
        assert blocker.finished == 1  # the worker's I/O was waited for, not abandoned
    assert (await target.task_management(tmf(TaskManagementFunction.QUERY_TASK, 7))).response == DONE
    assert len(target.logical_unit("disk0").tasks) == 0


async def test_abort_unknown_task_is_function_complete(target):
    assert (await target.task_management(tmf(TaskManagementFunction.ABORT_TASK, 99))).response == DONE


async def test_abort_task_set_only_this_nexus(target):
    await drain_ua(target)
    await drain_ua(target, initiator=INI_B)
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(1), req(2), req(3, initiator=INI_B))
        assert (await target.task_management(tmf(TaskManagementFunction.QUERY_TASK_SET))).response == \
            TmfServiceResponse.FUNCTION_SUCCEEDED
        resp = await target.task_management(tmf(TaskManagementFunction.ABORT_TASK_SET))
        events.append(("tmf", resp.response))
        assert sorted(e[2] for e in events if e[0] == "cmd") == [1, 2]
        blocker.release.set()
    assert events[2] == ("tmf", DONE)
    assert ("cmd", INI_B, 3, OK) in events
    assert (await target.task_management(tmf(TaskManagementFunction.QUERY_TASK_SET))).response == DONE


async def test_clear_task_set_aborts_all_and_tells_others(target):
    await drain_ua(target)
    await drain_ua(target, initiator=INI_B)
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(1), req(2, initiator=INI_B))
        resp = await target.task_management(tmf(TaskManagementFunction.CLEAR_TASK_SET))
        events.append(("tmf", resp.response))
    assert [e[-1] for e in events] == [ServiceResponse.TASK_ABORTED] * 2 + [DONE]
    r = await run(target, bytes(6), initiator=INI_B, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x2F, 0x00)
    assert_good(await run(target, bytes(6), clear_ua=False))


async def test_logical_unit_reset(target):
    await drain_ua(target)
    await drain_ua(target, initiator=INI_B)
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(1), req(2, initiator=INI_B))
        resp = await target.task_management(tmf(TaskManagementFunction.LOGICAL_UNIT_RESET))
        events.append(("tmf", resp.response))
    # virtio 1.2 5.6.6.1: commands a reset ends are told apart from aborted ones
    assert [e[-1] for e in events] == [ServiceResponse.TASK_ABORTED_BY_RESET] * 2 + [DONE]
    for ini in (INI_A, INI_B):
        r = await run(target, bytes(6), initiator=ini, clear_ua=False)
        assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x03)
    # the other LU of INI_A is untouched: only its POWER ON
    r = await run(target, bytes(6), lun=3, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x01)


async def test_i_t_nexus_reset(target):
    await drain_ua(target)
    await drain_ua(target, lun=3)
    await drain_ua(target, initiator=INI_B)
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(1), req(2, initiator=INI_B))
        resp = await target.task_management(tmf(TaskManagementFunction.I_T_NEXUS_RESET))
        events.append(("tmf", resp.response))
        blocker.release.set()
    assert events[0] == ("cmd", INI_A, 1, ServiceResponse.TASK_ABORTED_BY_RESET)
    assert events[1] == ("tmf", DONE)
    assert ("cmd", INI_B, 2, OK) in events
    for lun in (0, 3):
        r = await run(target, bytes(6), lun=lun, clear_ua=False)
        assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x07)
    assert_good(await run(target, bytes(6), initiator=INI_B, clear_ua=False))


async def test_tmf_addressing_and_clear_aca(target):
    assert (await target.task_management(tmf(TaskManagementFunction.CLEAR_ACA))).response == \
        TmfServiceResponse.FUNCTION_REJECTED
    beyond = TmfRequest(TaskManagementFunction.ABORT_TASK, 0x4000, 1, InitiatorPort(INI_A))
    assert (await target.task_management(beyond)).response == \
        TmfServiceResponse.INCORRECT_LOGICAL_UNIT_NUMBER
    assert (await target.task_management(tmf(TaskManagementFunction.ABORT_TASK, lun=9))).response == \
        TmfServiceResponse.INCORRECT_LOGICAL_UNIT_NUMBER


async def test_overlapped_tag(target):
    await drain_ua(target)
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(5))
        resp = await target.execute(req(5))
        assert resp.sense[2] & 0xF == SenseKey.ABORTED_COMMAND and resp.sense[12] == 0x4E
        blocker.release.set()
    assert events == [("cmd", INI_A, 5, OK)]


async def test_unmap_lun_aborts_its_tasks(target):
    await drain_ua(target)
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(1))
        target.unmap_lun(INI_A, 0)
    assert events == [("cmd", INI_A, 1, ServiceResponse.TASK_ABORTED)]


# -- unit attentions and events --------------------------------------------------------


async def test_resize_capacity_changed(target, tmp_path):
    seen = []
    target.subscribe(seen.append)
    await drain_ua(target)
    await drain_ua(target, initiator=INI_B)
    target.resize("disk0", 8 * MiB)
    assert seen == [CapacityChanged(INI_A, 0), CapacityChanged(INI_B, 0)]
    assert (tmp_path / "disk0.img").stat().st_size == 8 * MiB
    for ini in (INI_A, INI_B):
        r = await run(target, bytes(6), initiator=ini, clear_ua=False)
        assert_check(r, SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
    r = await run(target, bytes((0x25,)) + bytes(9), data_in=8)
    assert struct.unpack(">I", r.data[:4])[0] == 8 * MiB // 512 - 1


async def test_map_and_unmap_lun(target):
    seen = []
    target.subscribe(seen.append)
    await drain_ua(target)
    await drain_ua(target, lun=3)
    target.map_lun(INI_A, 5, "disk0")
    assert seen == [LunAdded(INI_A, 5)]
    assert target.luns_for(INI_A) == [0, 3, 5]
    r = await run(target, bytes(6), clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x3F, 0x0E)
    # REPORT LUNS clears 3Fh/0Eh on every LU of the nexus
    cdb = bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 64) + bytes(2)
    assert_good(await run(target, cdb, data_in=64, lun=0, clear_ua=False))
    assert_good(await run(target, bytes(6), lun=3, clear_ua=False))
    target.unmap_lun(INI_A, 5)
    assert seen[-1] == LunRemoved(INI_A, 5)
    assert target.luns_for(INI_A) == [0, 3]
    r = await run(target, bytes(6), lun=3, clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x3F, 0x0E)
    with pytest.raises(ValueError):
        target.map_lun(INI_A, 6, "nope")
    with pytest.raises(KeyError):
        target.unmap_lun(INI_A, 6)


async def test_request_sense_returns_and_clears_ua(target):
    r = await run(target, bytes((0x03, 0, 0, 0, 18, 0)), data_in=18, clear_ua=False)
    assert_good(r)
    assert r.data[0] == 0x70 and r.data[2] == SenseKey.UNIT_ATTENTION and r.data[12:14] == b"\x29\x01"
    r = await run(target, bytes((0x03, 1, 0, 0, 18, 0)), data_in=18, clear_ua=False)  # DESC
    assert r.data[0] == 0x72 and r.data[1] == SenseKey.NO_SENSE
    assert_good(await run(target, bytes(6), clear_ua=False))


async def test_nexus_loss(target):
    await drain_ua(target)
    target.nexus_loss(INI_A)
    r = await run(target, bytes(6), clear_ua=False)
    assert_check(r, SenseKey.UNIT_ATTENTION, 0x29, 0x07)


def test_constructor_errors(tmp_path):
    from bridge.scsi.logical_unit import LogicalUnitSpec
    from bridge.scsi.target import Target

    spec = LogicalUnitSpec(name="d", path=str(tmp_path / "d.img"), size=MiB)
    with pytest.raises(ValueError, match="no logical unit named"):
        Target([spec], {INI_A: {0: "x"}})
    with pytest.raises(ValueError, match="LUN"):
        Target([spec], {INI_A: {20000: "d"}})
    with pytest.raises(ValueError, match="block_size"):
        Target([LogicalUnitSpec(name="e", path=str(tmp_path / "e.img"), size=MiB,
                                block_size=1024)], {})
    with pytest.raises(ValueError, match="does not exist"):
        Target([LogicalUnitSpec(name="f", path=str(tmp_path / "f.img"))], {})
    with pytest.raises(ValueError, match="wwn"):
        Target([LogicalUnitSpec(name="g", path=str(tmp_path / "g.img"), size=MiB, wwn="naa.x")],
               {})
    with pytest.raises(ValueError, match="twice"):
        Target([spec, spec], {})


async def test_configured_identity_and_sidecar(tmp_path):
    import json

    from bridge.scsi.logical_unit import LogicalUnitSpec
    from bridge.scsi.target import Target

    spec = LogicalUnitSpec(name="d", path=str(tmp_path / "d.img"), size=MiB,
                           wwn="naa.6001405abcdef012", serial="SN-0001")
    t = Target([spec], {INI_A: {0: "d"}})
    lu = t.logical_unit("d")
    assert lu.identity.wwn == bytes.fromhex("6001405abcdef012") + bytes(8)
    assert lu.identity.serial == "SN-0001"
    t.close()
    side = json.loads((tmp_path / "d.img.vscsi-id.json").read_text())
    assert side["serial"] == "SN-0001"
    # generated identity is stable across restarts
    spec2 = LogicalUnitSpec(name="e", path=str(tmp_path / "e.img"), size=MiB)
    t = Target([spec2], {})
    wwn, serial = t.logical_unit("e").identity.wwn, t.logical_unit("e").identity.serial
    t.close()
    assert wwn[0] >> 4 == 6 and len(wwn) == 16
    t = Target([spec2], {})
    assert (t.logical_unit("e").identity.wwn, t.logical_unit("e").identity.serial) == (wwn, serial)
    t.close()


# -- persistent reservations through the core ------------------------------------------


def pr_out_req(sa, rkey=0, sakey=0, rtype=0, tag=100, initiator=INI_A):
    params = struct.pack(">QQ4xB3x", rkey, sakey, 0)
    cdb = struct.pack(">BBB2xIB", 0x5F, sa, rtype, len(params), 0)
    return ScsiRequest(lun=0, tag=tag, cdb=cdb, initiator=InitiatorPort(initiator),
                       data_out=[memoryview(params)])


async def test_preempt_and_abort_aborts_the_preempted_tasks_and_raises_ua(target):
    await drain_ua(target)
    await drain_ua(target, initiator=INI_B)
    for ini, key in ((INI_A, 0xA), (INI_B, 0xB)):
        resp = await target.execute(pr_out_req(0, sakey=key, initiator=ini))  # REGISTER
        assert resp.status == 0, resp
    resp = await target.execute(pr_out_req(1, rkey=0xB, rtype=1, initiator=INI_B))  # RESERVE WE
    assert resp.status == 0, resp
    blocker = BlockingRead()
    install(target, blocker)
    events = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(7, initiator=INI_B))
        # A preempts B's registration and reservation, aborting B's tasks (SPC-4 5.13.11.2.4)
        resp = await target.execute(pr_out_req(5, rkey=0xA, sakey=0xB, rtype=1))
        events.append(("pr", resp.status))
    assert events == [("cmd", INI_B, 7, ServiceResponse.TASK_ABORTED), ("pr", 0)]
    # B learns through a unit attention established by the reservations engine
    r = await run(target, bytes(6), initiator=INI_B, clear_ua=False)
    assert r.status == 2 and r.sense_key == SenseKey.UNIT_ATTENTION and r.asc_ascq[0] == 0x2A


async def test_logical_unit_reset_restores_saved_mode_pages_and_starts_the_unit(target):
    await drain_ua(target)
    params = bytes(4) + bytes((0x08, 0x12, 0x00)) + bytes(17)  # WCE=0, not saved
    r = await run(target, bytes((0x15, 0x10, 0, 0, len(params), 0)), data_out=params)
    assert_good(r)
    assert_good(await run(target, bytes((0x1B, 0, 0, 0, 0, 0))))  # STOP UNIT
    lu = target.logical_unit("disk0")
    assert not lu.mode.wce and lu.stopped
    assert (await target.task_management(tmf(TaskManagementFunction.LOGICAL_UNIT_RESET))).response == DONE
    assert lu.mode.wce and not lu.stopped
