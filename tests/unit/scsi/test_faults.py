"""Fault injection in the core (bridge/scsi/faults.py): matching, actions, counters, and
delayed/hung commands under every kind of abort and reset."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from bridge.scsi.faults import FaultAction, FaultInjector, FaultRule
from bridge.scsi.request import (
    InitiatorPort,
    ScsiRequest,
    ScsiStatus,
    ServiceResponse,
    TaskManagementFunction,
    TmfRequest,
    TmfServiceResponse,
)
from bridge.scsi.sense import SenseKey

from .helpers import (
    INI_A,
    INI_B,
    assert_check,
    assert_good,
    drain_ua,
    make_target,
    read10,
    write10,
)
from .helpers import run as run_with_ua_drain

F = TaskManagementFunction
DONE = TmfServiceResponse.FUNCTION_COMPLETE
ABORTED = ServiceResponse.TASK_ABORTED
RESET = ServiceResponse.TASK_ABORTED_BY_RESET
BS = 512


@pytest.fixture
async def target(tmp_path):
    t = make_target(tmp_path, extra_luns=True)
    for ini, lun in ((INI_A, 0), (INI_A, 3), (INI_B, 0)):
        await drain_ua(t, initiator=ini, lun=lun)
    yield t
    t.close()


async def run(target, cdb, **kw):
    """helpers.run without its REQUEST SENSE first (the fixture consumed the UAs; a
    rule would count that REQUEST SENSE too)."""
    kw.setdefault("clear_ua", False)
    return await run_with_ua_drain(target, cdb, **kw)


def injector(target) -> FaultInjector:
    return FaultInjector(target)


def rule(action: str, lu: str = "disk0", **kw) -> FaultRule:
    return FaultRule(lu=lu, action=FaultAction(action), **kw)


def pattern(lba: int, n: int) -> bytes:
    return b"".join(struct.pack(">I", lba + i) * (BS // 4) for i in range(n))


def information(sense: bytes) -> int | None:
    """INFORMATION of fixed-format sense data when VALID=1."""
    return struct.unpack_from(">I", sense, 3)[0] if sense[0] & 0x80 else None


async def fill(target, lba: int, n: int) -> None:
    assert_good(await run(target, write10(lba, n), data_out=pattern(lba, n)))


def req(cdb: bytes, tag: int, *, initiator: str = INI_A, lun: int = 0, data: bytes | None = None,
        nblocks: int = 1) -> ScsiRequest:
    if data is not None:
        return ScsiRequest(lun=lun, tag=tag, cdb=cdb, initiator=InitiatorPort(initiator),
                           data_out=[memoryview(data)])
    return ScsiRequest(lun=lun, tag=tag, cdb=cdb, initiator=InitiatorPort(initiator),
                       data_in=[memoryview(bytearray(BS * nblocks))])


def tmf(function: TaskManagementFunction, tag: int = 0, *, initiator: str = INI_A, lun: int = 0
        ) -> TmfRequest:
    return TmfRequest(function, lun, tag, InitiatorPort(initiator))


# -- rules as data ---------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "words"), [
    ({"action": "check_condition"}, "sense_key: check_condition needs"),
    ({"action": "check_condition", "sense_key": 6, "asc": 0x29}, "UNIT ATTENTION"),
    ({"action": "check_condition", "sense_key": 0xC, "asc": 0}, "not a sense key"),
    ({"action": "delay"}, "delay_ms: delay needs"),
    ({"action": "delay", "delay_ms": 0}, "delay_ms"),
    ({"action": "hang", "delay_ms": 5}, "delay_ms: only the delay action"),
    ({"action": "busy", "abort_fails": True}, "abort_fails: only the hang"),
    ({"action": "busy", "asc": 3}, "only the sense actions"),
    ({"action": "busy", "op": "verify"}, "op: must be one of read, write, other"),
    ({"action": "busy", "lba_first": 5}, "give both"),
    ({"action": "busy", "lba_first": 5, "lba_last": 4}, "lba_last: must not be below"),
    ({"action": "busy", "lba_first": 5, "lba_last": 6, "op": "other"}, "only reads and writes"),
    ({"action": "busy", "count": 0}, "count: must be a positive"),
    ({"action": "busy", "every": -2}, "every: must be a positive"),
    ({"action": "medium_error", "asc": 256}, "asc: must be between"),
])
def test_rule_validation_names_the_field(kw, words):
    action = FaultAction(kw.pop("action"))
    with pytest.raises(ValueError, match=words):
        FaultRule(lu="disk0", action=action, **kw).validate()


async def test_add_unknown_lu_and_no_rules_means_no_injector(target):
    inj = injector(target)
    with pytest.raises(KeyError):
        inj.add(rule("busy", lu="nope"))
    assert target.faults is None
    r = inj.add(rule("busy"))
    assert target.faults is inj
    inj.remove(r.id)
    assert target.faults is None
    with pytest.raises(KeyError):
        inj.remove(r.id)


# -- actions -----------------------------------------------------------------------------

async def test_medium_error_reports_the_lba_and_transfers_the_blocks_before_it(target):
    await fill(target, 10, 8)
    inj = injector(target)
    r = inj.add(rule("medium_error", op="read", lba_first=13, lba_last=14))
    res = await run(target, read10(10, 8), data_in=8 * BS)
    assert_check(res, SenseKey.MEDIUM_ERROR, 0x11, 0x00)
    assert information(res.resp.sense) == 13
    assert res.resp.residual == 5 * BS
    assert res.data == pattern(10, 3)  # blocks 10-12 are real data
    # a read starting inside the range fails at its own first LBA, nothing transferred
    res = await run(target, read10(14, 2), data_in=2 * BS)
    assert information(res.resp.sense) == 14 and res.resp.residual == 2 * BS
    # outside the range, and writes (op=read), are untouched
    assert_good(await run(target, read10(15, 3), data_in=3 * BS))
    assert_good(await run(target, write10(13, 1), data_out=pattern(13, 1)))
    assert (r.matched, r.hits) == (2, 2)
    # an LBA beyond the medium is still ILLEGAL REQUEST, not the fault
    inj.add(rule("medium_error"))
    res = await run(target, read10(1 << 30, 1), data_in=BS)
    assert_check(res, SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)


async def test_medium_error_on_write_writes_only_the_blocks_before(target):
    await fill(target, 0, 4)
    injector(target).add(rule("medium_error", op="write", lba_first=2, lba_last=2, asc=0x0C))
    res = await run(target, write10(0, 4), data_out=b"\xee" * 4 * BS)
    assert_check(res, SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
    assert information(res.resp.sense) == 2
    target.faults = None
    back = await run(target, read10(0, 4), data_in=4 * BS)
    assert back.data == b"\xee" * 2 * BS + pattern(2, 2)


@pytest.mark.parametrize(("action", "key", "asc", "ascq"), [
    ("hardware_error", SenseKey.HARDWARE_ERROR, 0x44, 0),
    ("not_ready", SenseKey.NOT_READY, 0x04, 0),
    ("aborted_command", SenseKey.ABORTED_COMMAND, 0, 0),
])
async def test_sense_presets(target, action, key, asc, ascq):
    injector(target).add(rule(action))
    assert_check(await run(target, bytes(6)), key, asc, ascq)  # TEST UNIT READY: op other


async def test_check_condition_custom_and_descriptor_format(target):
    injector(target).add(rule("check_condition", sense_key=3, asc=0x31, ascq=0x00, op="other"))
    assert_check(await run(target, bytes(6)), SenseKey.MEDIUM_ERROR, 0x31, 0x00)
    assert_good(await run(target, read10(0, 1), data_in=BS))


@pytest.mark.parametrize(("action", "status"), [("busy", ScsiStatus.BUSY),
                                                ("task_set_full", ScsiStatus.TASK_SET_FULL)])
async def test_busy_and_task_set_full_then_count_spent(target, action, status):
    r = injector(target).add(rule(action, count=2))
    for _ in range(2):
        res = await run(target, read10(0, 1), data_in=BS)
        assert res.resp.response is ServiceResponse.COMMAND_COMPLETE
        assert (res.status, res.resp.sense) == (status, b"")
    assert_good(await run(target, read10(0, 1), data_in=BS))
    assert (r.hits, r.spent) == (2, True)
    assert r.as_dict()["spent"] is True


async def test_every_nth_initiator_and_lu_filters(target):
    inj = injector(target)
    r = inj.add(rule("busy", initiator=INI_B, every=3))
    got = [(await run(target, read10(0, 1), data_in=BS, initiator=INI_B)).status for _ in range(6)]
    assert got == [0, 0, ScsiStatus.BUSY, 0, 0, ScsiStatus.BUSY]
    assert_good(await run(target, read10(0, 1), data_in=BS))  # INI_A
    assert_good(await run(target, read10(0, 1), data_in=BS, lun=3))  # disk1
    assert (r.matched, r.hits) == (6, 2)


async def test_first_rule_decides_and_unit_attention_comes_first(target):
    inj = injector(target)
    inj.add(rule("not_ready"))
    inj.add(rule("busy"))
    assert_check(await run(target, read10(0, 1), data_in=BS), SenseKey.NOT_READY, 4, 0)
    await target.task_management(tmf(F.LOGICAL_UNIT_RESET))
    # SAM-5 5.14: the pending unit attention is reported before any fault
    res = await run(target, read10(0, 1), data_in=BS, clear_ua=False)
    assert_check(res, SenseKey.UNIT_ATTENTION, 0x29, 0x03)


async def test_delay_then_runs(target):
    injector(target).add(rule("delay", delay_ms=200, op="write"))
    t0 = trio.current_time()
    assert_good(await run(target, write10(5, 1), data_out=pattern(5, 1)))
    assert trio.current_time() - t0 >= 0.2
    target.faults = None
    assert (await run(target, read10(5, 1), data_in=BS)).data == pattern(5, 1)


# -- delayed and hung commands under aborts and resets --------------------------------

async def start(nursery, target, events, r: ScsiRequest) -> None:
    async def one():
        resp = await target.execute(r)
        events.append(("cmd", r.initiator.name, r.tag, resp.response))
    nursery.start_soon(one)
    await trio.testing.wait_all_tasks_blocked()


async def test_delayed_write_aborted_writes_nothing(target, autojump_clock):
    await fill(target, 7, 1)
    injector(target).add(rule("delay", delay_ms=5000))
    events: list = []
    async with trio.open_nursery() as n:
        await start(n, target, events, req(write10(7, 1), 9, data=b"\x5a" * BS))
        resp = await target.task_management(tmf(F.ABORT_TASK, 9))
        events.append(("tmf", resp.response))
        await trio.sleep(10)  # well past the delay
    assert events == [("cmd", INI_A, 9, ABORTED), ("tmf", DONE)]
    target.faults = None
    assert (await run(target, read10(7, 1), data_in=BS)).data == pattern(7, 1)


TMFS = [F.ABORT_TASK, F.ABORT_TASK_SET, F.CLEAR_TASK_SET, F.LOGICAL_UNIT_RESET,
        F.I_T_NEXUS_RESET]


@pytest.mark.parametrize("function", TMFS, ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["read", "write"])
async def test_hung_command_ends_aborted_before_the_tmf(target, function, kind):
    await fill(target, 3, 1)
    r = injector(target).add(rule("hang", op=kind))
    cdb = read10(3, 1) if kind == "read" else write10(3, 1)
    data = b"\x77" * BS if kind == "write" else None
    events: list = []
    async with trio.open_nursery() as n:
        await start(n, target, events, req(cdb, 21, data=data))
        assert r.hung == 1 and len(target.logical_unit("disk0").tasks) == 1
        resp = await target.task_management(tmf(function, 21))
        events.append(("tmf", resp.response))
    ended = RESET if function in (F.LOGICAL_UNIT_RESET, F.I_T_NEXUS_RESET) else ABORTED
    assert events == [("cmd", INI_A, 21, ended), ("tmf", DONE)]
    assert r.hung == 0 and len(target.logical_unit("disk0").tasks) == 0
    injector(target)  # a fresh injector: no rules
    target.faults = None
    if function is F.I_T_NEXUS_RESET:
        await drain_ua(target)
    elif function is F.LOGICAL_UNIT_RESET:
        await drain_ua(target)
    assert (await run(target, read10(3, 1), data_in=BS)).data == pattern(3, 1)


async def test_hung_command_of_another_initiator_cleared_gets_ua(target):
    injector(target).add(rule("hang", initiator=INI_B))
    events: list = []
    async with trio.open_nursery() as n:
        await start(n, target, events, req(read10(0, 1), 4, initiator=INI_B))
        assert (await target.task_management(tmf(F.CLEAR_TASK_SET))).response == DONE
    assert events == [("cmd", INI_B, 4, ABORTED)]
    target.faults = None
    # SAM-5 7.4 (TAS=0): COMMANDS CLEARED BY ANOTHER INITIATOR
    res = await run(target, bytes(6), initiator=INI_B, clear_ua=False)
    assert_check(res, SenseKey.UNIT_ATTENTION, 0x2F, 0x00)


async def test_nexus_loss_aborts_hung_commands(target):
    injector(target).add(rule("hang"))
    events: list = []
    async with trio.open_nursery() as n:
        await start(n, target, events, req(read10(0, 1), 1))
        await start(n, target, events, req(read10(0, 1), 2, lun=3))  # disk1: no rule
        target.nexus_loss(INI_A)
    assert events == [("cmd", INI_A, 2, ServiceResponse.COMMAND_COMPLETE),
                      ("cmd", INI_A, 1, RESET)]


async def test_abort_fails_then_logical_unit_reset(target):
    r = injector(target).add(rule("hang", abort_fails=True))
    events: list = []
    async with trio.open_nursery() as n:
        await start(n, target, events, req(read10(0, 1), 0x33))
        resp = await target.task_management(tmf(F.ABORT_TASK, 0x33))
        assert resp.response is TmfServiceResponse.FUNCTION_REJECTED
        assert events == [] and r.hung == 1
        q = await target.task_management(tmf(F.QUERY_TASK, 0x33))
        assert q.response is TmfServiceResponse.FUNCTION_SUCCEEDED
        resp = await target.task_management(tmf(F.LOGICAL_UNIT_RESET))
        events.append(("tmf", resp.response))
    assert events == [("cmd", INI_A, 0x33, RESET), ("tmf", DONE)]


async def test_removing_the_rule_releases_hung_commands(target):
    await fill(target, 1, 1)
    inj = injector(target)
    r = inj.add(rule("hang"))
    events: list = []
    buf = bytearray(BS)
    async with trio.open_nursery() as n:
        request = ScsiRequest(lun=0, tag=5, cdb=read10(1, 1), initiator=InitiatorPort(INI_A),
                              data_in=[memoryview(buf)])
        await start(n, target, events, request)
        assert inj.clear() == [r]
    assert events == [("cmd", INI_A, 5, ServiceResponse.COMMAND_COMPLETE)]
    assert bytes(buf) == pattern(1, 1)
    assert target.faults is None


# -- PREEMPT AND ABORT (SPC-4 5.13.11.2.6) ----------------------------------------------

def pr_out(sa: int, rkey: int, sakey: int = 0, rtype: int = 0) -> tuple[bytes, bytes]:
    params = struct.pack(">QQIBBH", rkey, sakey, 0, 0, 0, 0)
    return struct.pack(">BBB2xIB", 0x5F, sa, rtype, len(params), 0), params


async def test_preempt_and_abort_aborts_the_preempted_initiators_hung_commands(target):
    KA, KB, WE_RO = 0xA, 0xB, 5
    for ini, key in ((INI_A, KA), (INI_B, KB)):
        cdb, params = pr_out(0, 0, key)  # REGISTER
        assert_good(await run(target, cdb, data_out=params, initiator=ini))
    cdb, params = pr_out(1, KB, 0, WE_RO)  # B reserves
    assert_good(await run(target, cdb, data_out=params, initiator=INI_B))
    await fill(target, 20, 2)
    r = injector(target).add(rule("hang", initiator=INI_B, abort_fails=True))
    events: list = []
    async with trio.open_nursery() as n:
        await start(n, target, events, req(write10(20, 1), 1, initiator=INI_B, data=b"\xbb" * BS))
        await start(n, target, events, req(read10(21, 1), 2, initiator=INI_B))
        assert r.hung == 2
        cdb, params = pr_out(5, KA, KB, WE_RO)  # A: PREEMPT AND ABORT B
        res = await run(target, cdb, data_out=params, initiator=INI_A)
        events.append(("pr out", res.status))
    assert sorted(events[:2]) == [("cmd", INI_B, 1, ABORTED), ("cmd", INI_B, 2, ABORTED)]
    assert events[2] == ("pr out", ScsiStatus.GOOD)
    assert r.hung == 0
    target.faults = None
    # B learns: REGISTRATIONS PREEMPTED (2Ah/05h); its write never reached the medium
    res = await run(target, read10(20, 1), data_in=BS, initiator=INI_B, clear_ua=False)
    assert_check(res, SenseKey.UNIT_ATTENTION, 0x2A, 0x05)
    assert (await run(target, read10(20, 1), data_in=BS)).data == pattern(20, 1)
    await trio.sleep(0.05)
    assert (await run(target, read10(20, 1), data_in=BS)).data == pattern(20, 1)


async def test_task_management_functions_are_counted(target):
    stats = target.enable_statistics()
    injector(target).add(rule("hang", abort_fails=True))
    async with trio.open_nursery() as n:
        await start(n, target, [], req(read10(0, 1), 8))
        await target.task_management(tmf(F.ABORT_TASK, 8))
        await target.task_management(tmf(F.LOGICAL_UNIT_RESET))
    await target.task_management(tmf(F.ABORT_TASK, 99, lun=7))  # no LU at LUN 7
    snap = stats.snapshot()
    assert snap["logical_units"]["disk0"]["task_management"] == {
        "ABORT_TASK": {"FUNCTION_REJECTED": 1}, "LOGICAL_UNIT_RESET": {"FUNCTION_COMPLETE": 1}}
    assert snap["initiators"][INI_A]["task_management"] == {
        "ABORT_TASK": {"FUNCTION_REJECTED": 1, "INCORRECT_LOGICAL_UNIT_NUMBER": 1},
        "LOGICAL_UNIT_RESET": {"FUNCTION_COMPLETE": 1}}
    assert snap["initiators"][INI_A]["errors_by_kind"] == {"TASK_ABORTED_BY_RESET": 1}
    stats.reset()
    assert stats.snapshot()["logical_units"]["disk0"]["task_management"] == {}
