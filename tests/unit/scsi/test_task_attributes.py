"""Task attributes (SAM-5 8.6/8.7) and ACA refusal, across initiators sharing one LU."""

from __future__ import annotations

import struct

import pytest
import trio

from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ScsiResponse,
    ScsiStatus,
    TaskAttribute,
    TaskManagementFunction,
    TmfRequest,
    TmfServiceResponse,
)

from .helpers import INI_A, INI_B, assert_check, drain_ua, make_target, read10, run

SYNC10 = struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)
S, ORD, H = TaskAttribute.SIMPLE, TaskAttribute.ORDERED, TaskAttribute.HEAD


@pytest.fixture
async def target(tmp_path):
    t = make_target(tmp_path)
    for ini in (INI_A, INI_B):
        await drain_ua(t, initiator=ini)
    yield t
    t.close()


class Flushes:
    """SYNCHRONIZE CACHE made slow: each flush waits for its own release, in a log."""

    def __init__(self, target, monkeypatch):
        self.started: list[int] = []
        self.release: dict[int, trio.Event] = {}
        lu = target.logical_unit("disk0")
        self.n = 0

        async def flush():
            i = self.n
            self.n += 1
            self.started.append(i)
            ev = self.release.setdefault(i, trio.Event())
            await ev.wait()

        monkeypatch.setattr(lu.backing, "flush", flush)

    def let(self, i):
        self.release.setdefault(i, trio.Event()).set()


def submit(target, cdb, attr, tag, initiator=INI_A, data_in=0):
    req = ScsiRequest(lun=0, tag=tag, cdb=cdb, initiator=InitiatorPort(initiator),
                      task_attr=attr, data_in=[memoryview(bytearray(data_in))] if data_in else [])
    return target.submit(req)


async def start_all(nursery, results, started):
    """Await each submitted command in a task, in a shuffled order of start."""
    for name, coro in reversed(list(started.items())):
        if isinstance(coro, ScsiResponse):
            results[name] = coro
            continue

        async def go(name=name, coro=coro):
            results[name] = await coro

        nursery.start_soon(go)


async def test_ordered_waits_for_older_and_blocks_newer(target, monkeypatch):
    f = Flushes(target, monkeypatch)
    results: dict[str, ScsiResponse] = {}
    async with trio.open_nursery() as n:
        started = {
            "s1": submit(target, SYNC10, S, 1),                  # flush 0
            "o": submit(target, SYNC10, ORD, 2, initiator=INI_B),  # another initiator, one task set
            "s2": submit(target, SYNC10, S, 3),
        }
        await start_all(n, results, started)
        await trio.testing.wait_all_tasks_blocked()
        assert f.started == [0]  # ORDERED dormant behind s1, s2 dormant behind ORDERED
        f.let(0)
        await trio.testing.wait_all_tasks_blocked()
        assert f.started == [0, 1] and set(results) == {"s1"}  # the ORDERED alone
        f.let(1)
        await trio.testing.wait_all_tasks_blocked()
        assert f.started == [0, 1, 2]
        f.let(2)
    assert all(r.status == ScsiStatus.GOOD for r in results.values())


async def test_head_of_queue_runs_at_once(target, monkeypatch):
    f = Flushes(target, monkeypatch)
    results: dict[str, ScsiResponse] = {}
    async with trio.open_nursery() as n:
        started = {
            "s1": submit(target, SYNC10, S, 1),
            "o": submit(target, SYNC10, ORD, 2),
            "h": submit(target, SYNC10, H, 3),
            "s2": submit(target, SYNC10, S, 4),
        }
        await start_all(n, results, started)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(f.started) == [0, 1]  # s1 and the HEAD OF QUEUE task
        f.let(0)
        f.let(1)
        await trio.testing.wait_all_tasks_blocked()
        assert set(results) == {"s1", "h"} and len(f.started) == 3  # then the ORDERED
        f.let(2)
        await trio.testing.wait_all_tasks_blocked()
        f.let(3)
    assert set(results) == {"s1", "o", "h", "s2"}


async def test_fast_path_not_taken_past_a_dormant_ordered(target, monkeypatch):
    f = Flushes(target, monkeypatch)
    results: dict[str, ScsiResponse] = {}
    async with trio.open_nursery() as n:
        started = {"s1": submit(target, SYNC10, S, 1), "o": submit(target, SYNC10, ORD, 2)}
        read = submit(target, read10(0, 1), S, 3, data_in=512)
        assert not isinstance(read, ScsiResponse)  # would have been a page-cache hit
        started["r"] = read
        await start_all(n, results, started)
        await trio.testing.wait_all_tasks_blocked()
        assert "r" not in results
        f.let(0)
        f.let(1)
    assert results["r"].status == ScsiStatus.GOOD
    # with nothing ordered pending, the same READ completes at once again
    assert isinstance(submit(target, read10(0, 1), S, 4, data_in=512), ScsiResponse)


async def test_aborting_a_dormant_ordered_releases_the_rest(target, monkeypatch):
    f = Flushes(target, monkeypatch)
    results: dict[str, ScsiResponse] = {}
    async with trio.open_nursery() as n:
        started = {"s1": submit(target, SYNC10, S, 1), "o": submit(target, SYNC10, ORD, 2),
                   "s2": submit(target, SYNC10, S, 3)}
        await start_all(n, results, started)
        await trio.testing.wait_all_tasks_blocked()
        tmf = await target.task_management(TmfRequest(TaskManagementFunction.ABORT_TASK, 0, 2,
                                                      InitiatorPort(INI_A)))
        assert tmf.response == TmfServiceResponse.FUNCTION_COMPLETE
        await trio.testing.wait_all_tasks_blocked()
        # the ORDERED ended (aborted): s2 waits only for older ORDERED/HEAD, none is left
        assert f.started == [0, 1]
        f.let(0)
        f.let(1)
    assert results["o"].response.name == "TASK_ABORTED"
    assert results["s2"].status == ScsiStatus.GOOD
    assert target.logical_unit("disk0").tasks.ordered_pending() == 0


async def test_aca_refused(target):
    # task attribute ACA: there is no ACA condition to run in (NormACA=0)
    r = await run(target, bytes(6), task_attr=TaskAttribute.ACA)
    assert_check(r, 0x05, 0x24)
    # NACA=1 in the CONTROL byte: INVALID FIELD IN CDB pointing at it (SAM-5 5.9)
    r = await run(target, bytes((0, 0, 0, 0, 0, 0x04)))
    assert_check(r, 0x05, 0x24)
    assert r.field_pointer == (True, 5, 2)
    # CLEAR ACA: FUNCTION REJECTED; INQUIRY NormACA (byte 3 bit 5) = 0
    tmf = await target.task_management(TmfRequest(TaskManagementFunction.CLEAR_ACA, 0, 9,
                                                  InitiatorPort(INI_A)))
    assert tmf.response == TmfServiceResponse.FUNCTION_REJECTED
    r = await run(target, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96)
    assert r.data[3] & 0x20 == 0


async def test_control_page_reports_what_is_done(target):
    """SPC-4 7.5.8: TST 000b (one task set for every I_T nexus), QUEUE ALGORITHM
    MODIFIER 1 (SIMPLE tasks may be reordered; ORDERED/HEAD OF QUEUE are honoured),
    QERR 00b (no abort of other tasks on CHECK CONDITION)."""
    r = await run(target, bytes((0x1A, 0x08, 0x0A, 0, 255, 0)), data_in=255)
    page = r.data[4:]
    assert page[0] & 0x3F == 0x0A
    assert page[2] >> 5 == 0  # TST
    assert page[3] >> 4 == 1  # QUEUE ALGORITHM MODIFIER
    assert (page[3] >> 1) & 0x3 == 0  # QERR
