"""Persistent reservations across target ports (SPC-4 5.13, 6.15.5, 6.16.3-6.16.4).

One guest (initiator name NAME) reaches disk0 through two paths: initiator port PATH1
via relative target port 1 and PATH2 via port 2; another initiator OTHER through port 1.
"""

from __future__ import annotations

import struct

import pytest
import trio

from bridge.scsi.alua import AccessState
from bridge.scsi.request import InitiatorPort, ScsiRequest, ScsiStatus, ServiceResponse
from bridge.scsi.reservations.codec import encode_iscsi_transport_id, parse_iscsi_transport_id
from bridge.scsi.sense import SenseKey

from .helpers import assert_check, assert_good, drain_ua, run
from .test_alua import NAME, OTHER, PATH1, PATH2, make
from .test_target_tasks import BlockingRead, install, req, start_blocked

REGISTER, RESERVE, PREEMPT_AND_ABORT, REGISTER_AND_MOVE = 0, 1, 5, 7
WE = 1
K1, K2 = 0x1111, 0x2222


@pytest.fixture
async def target(tmp_path):
    t = make(tmp_path, state2=AccessState.ACTIVE_OPTIMIZED)
    for ini in (PATH1, PATH2, OTHER):
        await drain_ua(t, initiator=ini)
    yield t
    t.close()


def pr_out(sa: int, params: bytes, rtype: int = 0) -> bytes:
    return struct.pack(">BBB2xIB", 0x5F, sa, rtype, len(params), 0)


def basic(rkey=0, sakey=0, all_tg_pt=False) -> bytes:
    return struct.pack(">QQ4xB3x", rkey, sakey, 0x04 if all_tg_pt else 0)


async def out(t, ini, sa, params, rtype=0):
    return await run(t, pr_out(sa, params, rtype), data_out=params, initiator=ini, clear_ua=False)


async def full_status(t, ini=PATH1) -> list[tuple[int, bool, bool, int, str]]:
    """READ FULL STATUS: (key, all_tg_pt, holder, relative target port, TransportID name)."""
    r = await run(t, bytes((0x5E, 3, 0, 0, 0, 0, 0, 0x10, 0, 0)), data_in=4096, initiator=ini,
                  clear_ua=False)
    assert_good(r)
    (n,) = struct.unpack(">I", r.data[4:8])
    out, i = [], 8
    while i < 8 + n:
        key, _r, flags, _st, rtpi, tlen = struct.unpack(">QIBB4xHI", r.data[i:i + 24])
        name, _used = parse_iscsi_transport_id(r.data[i + 24:i + 24 + tlen], 0)
        out.append((key, bool(flags & 2), bool(flags & 1), rtpi, name))
        i += 24 + tlen
    return out


async def test_read_full_status_reports_each_registration_s_port(target):
    assert_good(await out(target, PATH2, REGISTER, basic(sakey=K1)))
    assert_good(await out(target, OTHER, REGISTER, basic(sakey=K2)))
    assert await full_status(target) == [(K1, False, False, 2, PATH2), (K2, False, False, 1, OTHER)]
    # Without ALL_TG_PT only that I_T nexus is registered: the guest's other path is not.
    r = await out(target, PATH1, RESERVE, basic(rkey=K1), WE)
    assert r.status == ScsiStatus.RESERVATION_CONFLICT


async def test_all_tg_pt_registers_through_every_port(target):
    assert_good(await out(target, PATH1, REGISTER, basic(sakey=K1, all_tg_pt=True)))
    assert await full_status(target, OTHER) == [(K1, True, False, 1, PATH1),
                                                (K1, True, False, 2, PATH2)]
    # The other path reserves with that key: a Write Exclusive reservation has one holder
    # I_T nexus, the one that reserved.
    assert_good(await out(target, PATH2, RESERVE, basic(rkey=K1), WE))
    st = await full_status(target)
    assert [(e[3], e[2]) for e in st] == [(1, False), (2, True)]
    # Unregistering through either path removes every ALL_TG_PT registration.
    assert_good(await out(target, PATH1, REGISTER, basic(rkey=K1, sakey=0)))
    assert await full_status(target) == []


def register_and_move(rkey, sakey, rtpi, tid: bytes, unreg=False) -> bytes:
    return struct.pack(">QQxBHI", rkey, sakey, 0x02 if unreg else 0, rtpi, len(tid)) + tid


async def test_register_and_move_to_another_relative_target_port(target):
    assert_good(await out(target, PATH1, REGISTER, basic(sakey=K1)))
    assert_good(await out(target, PATH1, RESERVE, basic(rkey=K1), WE))
    # The guest's initiator name (format 00b) through relative target port 2 = PATH2.
    params = register_and_move(K1, K2, 2, encode_iscsi_transport_id(NAME), unreg=True)
    assert_good(await out(target, PATH1, REGISTER_AND_MOVE, params))
    assert await full_status(target) == [(K2, False, True, 2, PATH2)]
    # Writes: the new holder's path, not the old one (Write Exclusive).
    w = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0))
    assert_good(await run(target, w, data_out=bytes(512), initiator=PATH2, clear_ua=False))
    r = await run(target, w, data_out=bytes(512), initiator=PATH1, clear_ua=False)
    assert r.status == ScsiStatus.RESERVATION_CONFLICT


@pytest.mark.parametrize("rtpi,tid_name,byte", [(9, NAME, 18), (2, OTHER, 24)])
async def test_register_and_move_to_a_missing_nexus(target, rtpi, tid_name, byte):
    assert_good(await out(target, PATH1, REGISTER, basic(sakey=K1)))
    assert_good(await out(target, PATH1, RESERVE, basic(rkey=K1), WE))
    params = register_and_move(K1, K2, rtpi, encode_iscsi_transport_id(tid_name))
    r = await out(target, PATH1, REGISTER_AND_MOVE, params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x26)
    assert r.field_pointer[1] == byte


def test_transport_id_format_01b_round_trip():
    tid = encode_iscsi_transport_id(PATH2)
    assert tid[0] == 0x45  # FORMAT CODE 01b, iSCSI
    assert parse_iscsi_transport_id(tid, 0)[0] == PATH2


async def test_preempt_and_abort_aborts_on_every_port(target):
    """The guest registered through both paths (ALL_TG_PT) and has a command in flight on
    each; OTHER preempts its key: both paths' commands end ABORTED, both get the UA."""
    assert_good(await out(target, PATH1, REGISTER, basic(sakey=K1, all_tg_pt=True)))
    assert_good(await out(target, PATH1, RESERVE, basic(rkey=K1), WE))
    assert_good(await out(target, OTHER, REGISTER, basic(sakey=K2)))
    blocker = BlockingRead()
    install(target, blocker)
    events: list = []
    async with trio.open_nursery() as n:
        await start_blocked(n, target, blocker, events, req(7, initiator=PATH1),
                            req(8, initiator=PATH2))
        params = basic(rkey=K2, sakey=K1)
        resp = await target.execute(ScsiRequest(
            lun=0, tag=100, cdb=pr_out(PREEMPT_AND_ABORT, params, WE),
            initiator=InitiatorPort(OTHER), data_out=[memoryview(params)]))
        events.append(("pr", resp.status))
        blocker.release.set()
    assert sorted(e for e in events if e[0] == "cmd") == [
        ("cmd", PATH1, 7, ServiceResponse.TASK_ABORTED), ("cmd", PATH2, 8, ServiceResponse.TASK_ABORTED)]
    assert events[-1] == ("pr", 0)
    assert await full_status(target, OTHER) == [(K2, False, True, 1, OTHER)]
    for ini in (PATH1, PATH2):
        r = await run(target, bytes(6), initiator=ini, clear_ua=False)
        assert_check(r, SenseKey.UNIT_ATTENTION, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED
